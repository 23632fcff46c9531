"""``model=gmm``: an analytic model family for ground truth. The data are points in a small space (2-D by
default) drawn from a Gaussian mixture whose components carry class labels; a prompt names labels. The
"network" is the *exact* denoiser of that mixture under the scheduler's forward process, in closed form:

* VP schedulers (DDIM, Euler, DPM++, ...): x_t = a·x0 + √(1−a²)·ε with a = √ᾱ(t), prediction ε̂ = E[ε | x_t];
* flow matching (``FlowMatchEulerDiscreteScheduler``): x_t = (1−s)·x0 + s·ε with s = t/1000, prediction
  v̂ = E[ε − x0 | x_t].

Each component k (weight π_k, mean μ_k, isotropic std σ_k) stays Gaussian under both processes: x_t | k ~
N(m_k, v_k·I) with (m_k, v_k) = (a·μ_k, a²σ_k² + 1 − a²) (VP) or ((1−s)·μ_k, (1−s)²σ_k² + s²) (flow). With the
responsibilities r_k ∝ π_k·N(x_t; m_k, v_k) over the components the prompt allows (all of them for the empty
prompt: the unconditional model p(x)), the score is ∇log p_t(x_t) = Σ_k r_k (m_k − x_t)/v_k, so

    ε̂ = −√(1−a²)·score (VP),     v̂ = −s·score − Σ_k r_k (μ_k + c_k σ_k² (x_t − m_k)/v_k) (flow, c_k = 1−s),

the second term being E[x0 | x_t] = Σ_k r_k E_k[x0 | x_t]. Because the denoiser is exact, the loop, the
schedulers, every guider and every recorder run on it unchanged, and what a guided sampler produces can be
compared with the true p(x | c) and the tilted target p(x | c)^w·p(x)^(1−w) (``experiment=guidance_truth``).

Points decode to small pictures (the point as a dot over the mixture's component means) so grids, videos and
recorders show something; metrics and the truth experiment read the latents themselves.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from stablefused.families import Conditioning, Family, is_flow, register_family

# The default mixture: three labelled classes in 2-D, one with two modes, overlapping enough that guidance
# visibly trades coverage for separation.
DEFAULT_COMPONENTS = (
    {"label": "red", "weight": 1.0, "mean": [-2.0, 0.0], "std": 0.5},
    {"label": "green", "weight": 0.5, "mean": [1.0, 1.5], "std": 0.4},
    {"label": "green", "weight": 0.5, "mean": [1.0, -1.5], "std": 0.4},
    {"label": "blue", "weight": 1.0, "mean": [0.5, 0.0], "std": 0.6},
)
IMAGE_SIZE = 32  # side of the picture a point decodes to
VIEW = 4.0  # the picture shows [-VIEW, VIEW]^2


class GaussianMixtureDenoiser(torch.nn.Module):
    """The exact ε (VP) or velocity (flow) prediction of a labelled Gaussian mixture. ``forward(x, t,
    encoder_hidden_states)``: x (B, D, 1, 1), t the scheduler's timestep, encoder_hidden_states (B, 1, K) label
    weights (all zero: unconditional). Call :meth:`use` with the scheduler first (which process)."""

    def __init__(self, components: Sequence[dict], train_timesteps: int = 1000,
                 alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        labels = list(dict.fromkeys(c["label"] for c in components))
        means = torch.tensor([list(map(float, c["mean"])) for c in components], dtype=torch.float64)
        self.labels = labels
        self.register_buffer("means", means)
        self.register_buffer("stds", torch.tensor([float(c["std"]) for c in components], dtype=torch.float64))
        self.register_buffer("log_weights", torch.tensor([float(c["weight"]) for c in components],
                                                         dtype=torch.float64).log())
        self.register_buffer("component_label", torch.tensor([labels.index(c["label"]) for c in components]))
        self.config = FrozenDict(in_channels=means.shape[1], out_channels=means.shape[1], sample_size=1,
                                 num_labels=len(labels), components=[dict(c) for c in components])
        self.flow, self.train_timesteps = False, train_timesteps
        self.vp_sigmas: torch.Tensor | None = None
        if alphas_cumprod is not None:
            self.vp_sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.means.device

    def use(self, scheduler: Any) -> None:
        """Which forward process the scheduler samples: flow matching, or VP with its ᾱ table."""
        self.flow = is_flow(scheduler)
        self.train_timesteps = int(scheduler.config.num_train_timesteps)
        if not self.flow:
            self.vp_sigmas = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()

    def process(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, n) with x_t = c·x0 + n·ε at timestep ``t`` (per row)."""
        t = t.double().to(self.means.device)
        if self.flow:
            s = (t / self.train_timesteps).clamp(0, 1)
            return 1 - s, s
        grid = torch.arange(len(self.vp_sigmas), dtype=torch.float64, device=t.device)
        sigma = torch.from_numpy(np.interp(t.cpu().numpy(), grid.cpu().numpy(), self.vp_sigmas.cpu().numpy())).to(t)
        a = 1 / (1 + sigma**2).sqrt()
        return a, (1 - a**2).sqrt()

    def posterior(self, x: torch.Tensor, t: torch.Tensor, label_weights: torch.Tensor):
        """Per row: responsibilities r (B, M), component means m (M-broadcast) and variances v at x_t."""
        b = x.shape[0]
        c, n = self.process(t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1))
        c, n = c[:, None, None], n[:, None, None]  # (B, 1, 1)
        m = c * self.means[None]  # (B, M, D)
        v = c**2 * self.stds[None, :, None] ** 2 + n**2  # (B, M, 1)
        d = x.shape[1]
        logn = -((x[:, None, :] - m) ** 2).sum(-1, keepdim=True) / (2 * v) - 0.5 * d * torch.log(2 * math.pi * v)
        w = label_weights.double()[:, self.component_label]  # (B, M): the prompt's weight of each component
        unconditional = (label_weights.double().abs().sum(-1, keepdim=True) == 0)
        logw = torch.where(unconditional, self.log_weights[None], self.log_weights[None] + torch.log(w.clamp_min(0)))
        r = torch.softmax(logw + logn[..., 0], dim=1)  # (B, M)
        return r, m, v, c, n

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(shape[0], -1).double()
        r, m, v, c, n = self.posterior(flat, t, encoder_hidden_states.reshape(shape[0], -1))
        score = (r[..., None] * (m - flat[:, None, :]) / v).sum(1)  # (B, D)
        if self.flow:
            x0 = (r[..., None] * (self.means[None] + c * self.stds[None, :, None] ** 2 * (flat[:, None, :] - m) / v)).sum(1)
            out = -n[:, 0] * score - x0
        else:
            out = -n[:, 0] * score
        return (out.reshape(shape).to(dtype),)


class LabelTokenizer:
    """Prompts → label weights: the words of a prompt that are labels (none: unconditional)."""

    def __init__(self, labels: Sequence[str]):
        from stablefused.text import build_word_tokenizer

        self.labels = list(labels)
        self.words = build_word_tokenizer(self.labels)  # for the "unknown word" warnings and truncation

    model_max_length = property(lambda self: self.words.model_max_length)

    def get_vocab(self) -> dict:
        return self.words.get_vocab()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.words(*args, **kwargs)

    def weights(self, prompts: Sequence[str]) -> torch.Tensor:
        from stablefused.text import words

        out = torch.zeros(len(prompts), 1, len(self.labels))
        for i, p in enumerate(prompts):
            for w in words(p):
                if w in self.labels:
                    out[i, 0, self.labels.index(w)] = 1.0
        return out


@register_family
class GMM(Family):
    """A labelled Gaussian mixture with its exact denoiser (ground truth for guidance research)."""

    name = "gmm"
    components = ("tokenizer", "network")
    pipelines = ("GaussianMixture",)
    reference = "GaussianMixture"
    attention = None

    @property
    def network(self) -> GaussianMixtureDenoiser:
        return self.c.modules["network"]

    @property
    def prediction_type(self) -> str:
        return "flow" if self.network.flow else "epsilon"

    @property
    def vae_scale_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return int(self.network.config.in_channels)

    @property
    def default_size(self) -> int:
        return IMAGE_SIZE

    def latent_shape(self, n: int, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        return (n, self.latent_channels, 1, 1)

    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        return Conditioning({"encoder_hidden_states": self.c.tokenizer.weights(prompts).to(self.c.device)})

    def set_timesteps(self, scheduler: Any, steps: int, height: int, width: int) -> None:
        super().set_timesteps(scheduler, steps, height, width)
        self.network.use(scheduler)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.network(x, t, cond.embeds)[0]

    def image_latents(self, encoded: Sequence[Any], generators: Sequence[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError("model=gmm has no images to encode")

    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Each point as a picture: white, the component means as grey dots, the point as a black dot."""
        pts = latents.reshape(len(latents), -1)[:, :2].double().cpu().numpy()
        size = IMAGE_SIZE
        yy, xx = np.mgrid[0:size, 0:size]

        def to_px(p: np.ndarray) -> np.ndarray:
            return (p + VIEW) / (2 * VIEW) * (size - 1)

        base = np.ones((size, size, 3), np.float32)
        for mu in self.network.means[:, :2].cpu().numpy():
            cx, cy = to_px(mu)
            base[(xx - cx) ** 2 + (yy - (size - 1 - cy)) ** 2 <= 2.0] = 0.75
        out = np.repeat(base[None], len(pts), axis=0)
        for i, p in enumerate(pts):
            cx, cy = to_px(np.clip(p, -VIEW, VIEW))
            out[i][(xx - cx) ** 2 + (yy - (size - 1 - cy)) ** 2 <= 2.5] = 0.0
        return out

    @classmethod
    def unsupported(cls, cfg: Any) -> list[str]:
        task = cfg.get("task")
        if task in ("img2img", "inpaint", "txt2video"):
            return [f"task={task}: model=gmm has no images to start from (its samples are points); use task=txt2img, "
                    "task=guidance_grid or task=walk"]
        return []


def build_gmm(seed: int = 0, components: Sequence[dict] = DEFAULT_COMPONENTS):
    """The mixture as a model: its exact denoiser, a label tokenizer, and a VP (DDIM) scheduler config; ``scheduler=flow_euler`` samples the flow-matching process instead."""
    from diffusers import DDIMScheduler

    from stablefused.models import Components

    # DDPM's linear β schedule, trailing timesteps: the first step starts at ᾱ = 4e-5, so starting from N(0, I)
    # is exact to ~0.6 % of the data's scale (SD's scaled_linear ends at ᾱ = 0.0047: a 7 % start error that
    # the ODE carries into the samples)
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    net = GaussianMixtureDenoiser(components, alphas_cumprod=sched.alphas_cumprod)
    modules = {"tokenizer": LabelTokenizer(net.labels), "network": net}
    return Components("gmm", modules, {**sched.config, "_class_name": "DDIMScheduler"}, torch.device("cpu"),
                      torch.float32, source="builtin:gmm", family_name="gmm")


def _register() -> None:
    from stablefused.models import BUILTIN_MODELS

    BUILTIN_MODELS["gmm"] = build_gmm


_register()
