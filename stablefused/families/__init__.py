"""Model families: what differs between SD 1.x/2.x, SDXL, SD3/3.5, Flux and UNet3D video, in one small
adapter each, so that the one loop (:func:`stablefused.sampling.denoise`), guidance, recorders and tasks see
only a :class:`Family` and its :class:`Conditioning`.

A family knows how to

* encode prompts into a :class:`Conditioning` (per-row tensors: text embeddings, pooled embeddings, SDXL's
  ``time_ids``, ...; :meth:`Family.encode`),
* make initial noise of the right shape (:meth:`Family.noise`; Flux packs it 2x2) and set the scheduler's
  timesteps for a run (:meth:`Family.set_timesteps`; Flux's resolution-dependent shift lives there),
* call its network for a batch of rows (:meth:`Family.__call__`) and say what the output is
  (:attr:`Family.prediction_type`: ``epsilon``, ``v_prediction`` or ``flow``),
* move latents between the scheduler's layout and the spatial (B, C, H, W) layout that hooks, previews and
  VAEs use (:meth:`Family.to_spatial` / :meth:`Family.from_spatial`), and encode/decode images.

diffusers' pipeline files are the reference for each family's math; each adapter names the pipeline method
it follows. Families register by name (:func:`register_family`) and are picked from a model folder's
``model_index.json`` pipeline class (:func:`family_for_pipeline`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from stablefused.errors import NonFiniteError

FRAMES_PER_DECODE = 8  # video frames per VAE call: a whole batch of videos at once would not fit in memory


class Conditioning:
    """What a family's network is conditioned on, for a batch of rows.

    ``rows``: tensors with one row per sample (batch first): ``encoder_hidden_states`` (the text sequence,
    every family has it) and family-specific ones (SDXL ``text_embeds``/``time_ids``, SD3/Flux
    ``pooled_projections``, Flux ``guidance``). ``shared``: tensors the same for every row (Flux ``txt_ids``).
    Guidance selects rows (:meth:`select`), batches concatenate (:meth:`cat`), walks interpolate every row
    tensor alike (:meth:`map`)."""

    def __init__(self, rows: dict[str, torch.Tensor], shared: dict[str, Any] | None = None):
        if "encoder_hidden_states" not in rows:
            raise ValueError("a Conditioning needs encoder_hidden_states")
        self.rows, self.shared = dict(rows), dict(shared or {})

    @property
    def embeds(self) -> torch.Tensor:
        """The text sequence (B, L, D) that cross-/joint-attention reads."""
        return self.rows["encoder_hidden_states"]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.rows.items())
        return f"Conditioning({fields})"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        """The same conditioning with ``fn`` applied to every per-row tensor."""
        return Conditioning({k: fn(v) for k, v in self.rows.items()}, self.shared)

    def select(self, index: torch.Tensor | Sequence[int]) -> "Conditioning":
        index = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        return self.map(lambda v: v.index_select(0, index.to(v.device)))

    def expand(self, n: int) -> "Conditioning":
        """A one-row conditioning repeated for ``n`` rows."""
        if len(self) != 1:
            raise ValueError(f"expand needs one row, this conditioning has {len(self)}")
        return self.map(lambda v: v.expand(n, *v.shape[1:]))

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)

        return self.map(move)

    @staticmethod
    def cat(items: Iterable["Conditioning"]) -> "Conditioning":
        items = list(items)
        keys = list(items[0].rows)
        for c in items[1:]:
            if list(c.rows) != keys:
                raise ValueError(f"cannot concatenate conditionings with fields {keys} and {list(c.rows)}")
        return Conditioning({k: torch.cat([c.rows[k] for c in items]) for k in keys}, items[0].shared)


def is_flow(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching process (x_t = (1−s)·x0 + s·ε; SD3, Flux)."""
    return type(scheduler).__name__.startswith("FlowMatch")


class Family:
    """Base adapter: the SD 1.x/2.x behaviour where a family does not override it.

    Subclasses set ``name``, ``components`` (the diffusers component names it loads, optional ones in
    ``optional``), ``pipelines`` (pipeline class names in ``model_index.json`` that mean this family) and
    ``reference`` (the diffusers pipeline its math follows)."""

    name = ""
    components: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()
    reference = ""
    attention = "cross"  # text→image attention: "cross" (UNet attn2), "joint" (MMDiT), None
    # classifier-free guidance as the reference pipeline runs it: one network call on [uncond, cond] rows
    # (SD, SDXL, SD3), or one call per prediction (False: FluxPipeline's true CFG, which keeps the peak
    # activation memory of a large transformer at one batch)
    cfg_in_one_call = True
    # model-level settings the family reads from the model config (``model.<key>``; None there = this default),
    # e.g. SDXL's original_size. They reach the adapter as ``components.info["model"]``.
    settings: dict[str, Any] = {}

    def __init__(self, c: Any):
        self.c = c

    # ------------------------------------------------------------------ the network
    @property
    def network(self) -> Any:
        return self.c.network

    @property
    def prediction_type(self) -> str:
        return self.c.scheduler_config.get("prediction_type", "epsilon")

    @property
    def in_channels(self) -> int:
        """Channels the network takes (latents + any extra channels, e.g. 9 for an inpainting UNet)."""
        return int(self.network.config.in_channels)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's prediction for rows ``x`` (already scaled by the scheduler, extra channels
        concatenated) at timestep ``t`` under ``cond`` (one row per row of ``x``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        """Prompts → conditioning. ``negative``: these are negative prompts (SDXL zeroes empty ones when its
        config says ``force_zeros_for_empty_prompt``)."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose words the prompt is checked against (unknown/truncated words)."""
        return self.c.tokenizer

    # ------------------------------------------------------------------ latents and scheduler
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.c.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.c.vae.config.latent_channels)

    @property
    def default_size(self) -> int:
        return int(self.network.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def latent_shape(self, n: int, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """Shape of the noise as drawn (the spatial layout; :meth:`from_spatial` packs it if needed)."""
        f = self.vae_scale_factor
        return (n, self.latent_channels) + ((frames,) if frames else ()) + (height // f, width // f)

    def noise(self, generators: Sequence[torch.Generator], height: int, width: int,
              frames: int | None = None) -> torch.Tensor:
        """Unit Gaussian noise per row from its own generator, in the scheduler's layout (as the family's
        ``prepare_latents`` draws it)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(len(generators), height, width, frames)
        x = randn_tensor(shape, generator=list(generators), device=self.c.device, dtype=self.c.dtype)
        return self.from_spatial(x)

    def set_timesteps(self, scheduler: Any, steps: int, height: int, width: int) -> None:
        """Set ``scheduler`` to ``steps`` for an image of this size: the one place a run's timesteps are set."""
        scheduler.set_timesteps(steps, device=self.c.device)

    def first_step(self, steps: int, strength: float) -> int:
        """The first of ``steps`` steps that image-to-image runs at ``strength``: the img2img pipeline's
        ``get_timesteps`` (SD: ``int(strength * steps)`` steps run; the flow-matching pipelines (SD3, Flux)
        round the first step down instead)."""
        if self.prediction_type == "flow":
            return int(max(steps - min(steps * strength, steps), 0))
        return max(steps - min(int(steps * strength), steps), 0)

    def sigmas(self, scheduler: Any) -> list[float]:
        """Noise level of every loop iteration in the x = x0 + σ·ε convention (what guidance schedules and
        recorders read), whatever the scheduler's own parameterisation. Flow matching (x = (1−s)·x0 + s·ε):
        σ = s / (1 − s), infinite at s = 1."""
        sigmas = getattr(scheduler, "sigmas", None)
        n = len(scheduler.timesteps)
        if is_flow(scheduler):  # s → σ = s/(1−s): the same noise-to-signal ratio as x = x0 + σ·ε
            return [math.inf if float(s) >= 1 else float(s) / (1 - float(s)) for s in sigmas[:n]]
        if sigmas is not None and len(sigmas) >= n:
            return [float(s) for s in sigmas[:n]]
        ac = scheduler.alphas_cumprod
        out = []
        for t in scheduler.timesteps:
            a = max(float(ac[int(t)]), 1e-20)  # zero-SNR schedules end at alpha_bar = 0
            out.append(math.sqrt((1 - a) / a))
        return out

    def to_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Scheduler layout → (B, C, H, W) (or (B, C, F, H, W) for video)."""
        return latents

    def from_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → the scheduler's layout."""
        return latents

    # ------------------------------------------------------------------ images
    def image_latents(self, encoded: Sequence[Any], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Latents of encoded images (:func:`stablefused.images.encode` outputs), one draw from each row's
        generator, in the spatial layout and the scheduler's scale (as the img2img pipeline's
        ``prepare_latents``)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.c.vae
        latents = torch.cat([retrieve_latents(e, generator=g) for e, g in zip(encoded, generators)])
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.c.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Spatial latents (B, C, H, W) → float images (B, H, W, 3) in [0, 1], in batches of ``batch_size``."""
        if latents.ndim == 5:  # video (B, C, F, H, W): decoded as images, TextToVideoSDPipeline.decode_latents
            b, c, f, h, w = latents.shape
            frames = self.decode(latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w),
                                 batch_size or FRAMES_PER_DECODE)
            return frames.reshape(b, f, *frames.shape[1:])
        vae = self.c.vae
        shift = vae.config.get("shift_factor") or 0.0
        out = []
        for chunk in latents.split(batch_size or len(latents)):
            z = chunk.to(vae.dtype) / vae.config.scaling_factor
            img = vae.decode(z + shift if shift else z, return_dict=False)[0]
            if not bool(torch.isfinite(img).all()):  # would be written as a black image
                raise NonFiniteError(f"decode: the VAE returned NaN/inf ({vae.dtype}); likely float16 overflow in the "
                                     "VAE, try dtype=float32 or bfloat16")
            out.append((img / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def input_problem(self, latents: torch.Tensor, extra: torch.Tensor | None) -> str | None:
        """Why the network cannot take these latents (+ extra channels), or None."""
        need = self.in_channels
        have = latents.shape[1] + (0 if extra is None else extra.shape[1])
        if need == have:
            return None
        hint = " (an inpainting model: use task=inpaint)" if need == 2 * latents.shape[1] + 1 else ""
        kind = "UNet" if "UNet" in type(self.network).__name__ else "transformer"
        return f"its {kind} takes {need} input channels, this task gives it {have}{hint}"

    @classmethod
    def setting_problems(cls, model_cfg: Any) -> list[str]:
        """One line per bad value of this family's :attr:`settings` in the model config (checked before the
        model loads)."""
        return []

    def latent_rgb(self) -> tuple[Any, Any, str] | None:
        """Published linear latent→RGB coefficients for this model's VAE: (weight (C, 3), bias (3,), source),
        mapping scaled latents to RGB in [-1, 1]; None to let the preview fit them
        (:mod:`stablefused.preview`)."""
        return None

    # ------------------------------------------------------------------ what works where
    @classmethod
    def unsupported(cls, cfg: Any) -> list[str]:
        """One line per setting of the composed config this family cannot do: a classmethod, so that it is
        checked before the model loads where the family is known then (:func:`family_of_model_cfg`), and
        right after loading otherwise (a hub model)."""
        sched = (cfg.get("scheduler") or {}).get("cls")
        if sched and str(sched).startswith("FlowMatch"):  # σ-free flow schedulers on an ε/v model: silent noise
            return [f"scheduler={cfg.scheduler.get('name', sched)}: {sched} is a flow-matching scheduler (SD3, Flux); "
                    f"this is an {cls.name} model: use scheduler=default or another of conf/scheduler/"]
        return []


_FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    _FAMILIES[cls.name] = cls
    return cls


def _load_all() -> None:
    __import__(f"{__name__}.sd")  # registers sd, video (found by name, as tasks and plugins are: no import circle)

    for name in ("sdxl", "sd3", "flux", "gmm"):
        try:
            __import__(f"stablefused.families.{name}")
        except ImportError:  # a family not written yet
            pass


def family_class(name: str) -> type[Family]:
    _load_all()
    if name not in _FAMILIES:
        raise ValueError(f"model family {name!r}: unknown; families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def family_settings() -> set[str]:
    """Every family's model-level setting names (allowed ``model.<key>`` beyond the loader's own)."""
    _load_all()
    return {k for cls in _FAMILIES.values() for k in cls.settings}


def settings_problems(model_cfg: Any) -> list[str]:
    """Every family's complaints about its settings in ``model_cfg`` (:meth:`Family.setting_problems`)."""
    _load_all()
    return [line for cls in _FAMILIES.values() for line in cls.setting_problems(model_cfg)]


def family_for_pipeline(pipeline_class: str | None, network_class: str | None = None) -> str:
    """The family a ``model_index.json`` describes: by its pipeline class (any pipeline of the family:
    text-to-image, img2img, inpaint, PAG, ...), else by its network's class."""
    _load_all()
    matches = [(len(p), name) for name, cls in _FAMILIES.items() for p in cls.pipelines
               if pipeline_class and pipeline_class.startswith(p)]
    if matches:  # the longest prefix: StableDiffusionXL... is SDXL, not SD
        return max(matches)[1]
    return _BY_NETWORK.get(network_class or "", "sd")


def family_of_model_cfg(model: Any) -> str | None:
    """The family a model config names, without loading it (for the checks before the model loads):
    ``model.family`` if set, a built-in model's, else the pipeline class in its local or bundled folder's (or
    the hub cache's) ``model_index.json``; None when that is not known without loading (a single file, an
    uncached hub id)."""
    import json
    from pathlib import Path

    if model.get("family"):
        return str(model.get("family"))
    _load_all()
    if model.get("builtin"):  # gmm, tiny_<family>[_variant]; other built-ins are SD
        name = str(model.get("builtin"))
        return next((n for n in (name, name.removeprefix("tiny_"), name.removeprefix("tiny_").split("_")[0])
                     if n in _FAMILIES), "sd")
    index = None
    if model.get("path") or model.get("bundled"):
        from stablefused.paths import bundled_models_dir

        folder = Path(str(model.get("path"))).expanduser() if model.get("path") else bundled_models_dir() / str(model.get("bundled"))
        index = folder / "model_index.json"
    elif model.get("hub_id"):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model.get("hub_id")), "model_index.json", revision=model.get("revision"))
        except Exception:  # not a valid repo id: the model check says so
            found = None
        index = Path(found) if isinstance(found, str) else None
    try:
        data = json.loads(index.read_text()) if index is not None and index.is_file() else None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return None
    network = data.get("unet") or data.get("transformer") or [None, None]
    return family_for_pipeline(data.get("_class_name"), network[-1] if isinstance(network, list) else None)


_BY_NETWORK = {"UNet3DConditionModel": "video", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def family_of_network(network: Any) -> str:
    """The family a loaded network belongs to: by its class, and for a UNet by its config (SDXL's UNet takes
    ``text_time`` added conditions)."""
    name = type(network).__name__
    if name in _BY_NETWORK:
        return _BY_NETWORK[name]
    config = getattr(network, "config", None) or {}
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd"
