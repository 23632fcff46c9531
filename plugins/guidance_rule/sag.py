import torch
import torch.nn.functional as F

from stablefused.guidance import COND, UNCOND, Guider, dependent, per_sample
from stablefused.registry import register


@register("guidance_rule", "sag")
class SAG(Guider):
    """Self-attention guidance: push away from the prediction on an x̂0 blurred where the model attends
    (Hong, Lee, Jang, Kim 2023).

    Hong, Lee, Jang, Kim 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance"
    (ICCV 2023, arXiv:2210.00939), eq. 16 with CFG on the unconditional branch (eq. 25) as in diffusers'
    ``StableDiffusionSAGPipeline``::

        ε̃ = ε(x|∅) + w (ε(x|c) − ε(x|∅)) + s (ε(x|∅) − ε(x̂|∅))
        x̂ = √ᾱ ((1 − M) ⊙ x̂0 + M ⊙ G(x̂0)) + √(1−ᾱ) ε̂         x̂0, ε̂ from ε(x|∅) at this step

    G: a Gaussian blur (kernel ``blur_kernel``, std ``blur_sigma``, reflect padding); M: the mask of latent
    positions whose mid-block self-attention, averaged over heads and summed over the queries of the
    unconditional pass, exceeds 1 (the mean), nearest-resized from the attention grid; ε(x̂|∅): a second,
    sequential network call on the degraded input with the unconditional prompt (one extra row per sample:
    3 rows per step with CFG, 2 at w = 0 or 1). At w = 1 every ∅ above is the prompt c (the pipeline's branch
    without CFG: ε = ε(x|c) + s (ε(x|c) − ε(x̂|c))); w = 0 is the same on the unconditional prompt alone. The
    pipeline has no w < 1 (it treats w ≤ 1 as w = 1); here w ≠ 1 uses the formula above, any real w.
    Defaults as the pipeline: s = 0.75 (``sag_scale``), blur kernel 9, σ = 1.0; s = 0: plain CFG.

    x̂0, ε̂ and the re-noising are computed in the UNet's input space (x_in = √ᾱ x0 + √(1−ᾱ) ε with
    ᾱ = 1/(1 + σ²), ε or v prediction), which is the pipeline's formula for the schedulers it accepts (DDIM,
    PNDM, DDPM, DEIS, UniPC, DPM-Solver: unscaled inputs, integer timesteps) and the same formula for the
    σ-schedulers it refuses (Euler, Heun, LMS, ...: their scaled input; checked against DDIM at the first
    step, where both see the same input). With Karras sigmas the pipeline reads ᾱ at the rounded timestep for
    x̂0 and re-noises at the scheduler's σ; here both use σ. UNet families (``sd``, ``sdxl``; SDXL has no
    reference pipeline) only: the map is the mid block's first self-attention layer, as the pipeline's.
    """

    families = ("sd", "sdxl")
    attention_layer = "mid_block"  # the pipeline's mid_block.attentions[0].transformer_blocks[0].attn1

    @classmethod
    def check(cls, params):
        k, sigma = params.get("blur_kernel", 9), params.get("blur_sigma", 1.0)
        problems = []
        if not (isinstance(k, int) and k >= 1 and k % 2):
            problems.append(f"blur_kernel={k}: must be an odd positive integer (the blur keeps the latent size)")
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            problems.append(f"blur_sigma={sigma}: must be > 0")
        return problems

    def __init__(self, scale: float = 0.75, blur_sigma: float = 1.0, blur_kernel: int = 9):
        if problems := self.check({"blur_sigma": blur_sigma, "blur_kernel": blur_kernel}):
            raise ValueError(f"sag: {problems[0]}")
        self.scale, self.blur_sigma, self.blur_kernel = float(scale), float(blur_sigma), int(blur_kernel)
        self.name = dependent("sag")

    def needs(self, w, info):
        everyone = torch.ones_like(w, dtype=torch.bool)
        return {COND: w != 0, UNCOND: w != 1, self.name: everyone if self.scale != 0 else ~everyone}

    def dependent_input(self, name, p, maps, w, info):
        on_cond = w == 1  # the pipeline's branch without CFG: the conditional prediction and map
        rows = on_cond.view(-1, *([1] * (p[COND].ndim - 1)))
        pred = torch.where(rows, p[COND], p[UNCOND])
        attn = torch.where(on_cond.view(-1, 1, 1, 1), maps[COND], maps[UNCOND])
        x0, eps = self._x0_eps(pred, info)
        mask = attn.sum(1) > 1.0  # (B, h, w): keys the queries attend to more than on average
        mask = mask.unsqueeze(1).repeat(1, x0.shape[1], 1, 1).type(attn.dtype)
        mask = F.interpolate(mask, x0.shape[-2:])
        degraded = gaussian_blur_2d(x0, self.blur_kernel, self.blur_sigma) * mask + x0 * (1 - mask)
        a = 1.0 / (1.0 + float(info.sigma) ** 2)
        return a ** 0.5 * degraded + (1 - a) ** 0.5 * eps, on_cond

    @staticmethod
    def _x0_eps(pred, info):
        """x̂0 and ε̂ from a prediction, in the pipeline's form (``pred_x0``, ``pred_epsilon``)."""
        x, a = info.model_input, 1.0 / (1.0 + float(info.sigma) ** 2)
        if info.prediction_type == "epsilon":
            return (x - (1 - a) ** 0.5 * pred) / a ** 0.5, pred
        if info.prediction_type == "v_prediction":
            return a ** 0.5 * x - (1 - a) ** 0.5 * pred, (1 - a) ** 0.5 * x + a ** 0.5 * pred
        if info.prediction_type == "sample":
            return pred, (x - a ** 0.5 * pred) / (1 - a) ** 0.5
        raise ValueError(f"sag: prediction_type {info.prediction_type!r} is not epsilon, v_prediction or sample")

    def combine(self, p, w, info):
        c, u = p[COND], p[UNCOND]
        out = u + per_sample(w, c) * (c - u)
        if self.scale != 0:
            base = torch.where(per_sample(w, c) == 1, c, u)
            out = out + self.scale * (base - p[self.name])
        return out


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """``StableDiffusionSAGPipeline``'s blur: a separable Gaussian of ``kernel_size`` taps (odd), reflect
    padding, per channel."""
    half = kernel_size // 2
    if half >= min(img.shape[-2:]):
        raise ValueError(f"sag: blur_kernel={kernel_size} needs latents larger than {half} on each side, got "
                         f"{tuple(img.shape[-2:])}; use a smaller blur_kernel or a larger image")
    x = torch.linspace(-(kernel_size - 1) * 0.5, (kernel_size - 1) * 0.5, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    return F.conv2d(F.pad(img, [half] * 4, mode="reflect"), k2, groups=img.shape[-3])

