from typing import Literal

import torch

from stablefused.guidance import GuidanceRule, per_sample
from stablefused.registry import register


@register("guidance_rule", "apg")
class APG(GuidanceRule):
    """Adaptive projected guidance: the CFG update split against the conditional prediction (Sadat et al. 2024).

    Sadat, Hilliges, Weber 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in
    Diffusion Models" (arXiv:2410.02416), per sample (norms and inner products over all
    non-batch dimensions)::

        D       = c - u                                  guidance update
        D       = D + momentum * D_prev  (D_prev := D)   reverse momentum, beta = momentum (paper: beta < 0)
        D       = D * min(1, r / ||D||)                  rescaling, only when r > 0
        D_par   = (<D, c> / ||c||^2) c                   parallel to the conditional prediction
        D_perp  = D - D_par
        out     = c + (w - 1) (D_perp + eta * D_par)

    With eta = 1, r = 0, momentum = 0 this is exactly CFG. The paper recommends eta = 0 (the parallel part
    causes the oversaturation); r and beta are tuned per model (its reference code uses beta = -0.75).
    Defaults: eta = 0, no rescaling, no momentum.

    ``space="x0"`` (default) follows the paper: c and u are first turned into denoised predictions
    x̂0 = A·x_in − B·pred (``StepInfo.to_x0``), the update is computed there (r in x̂0 units), and the
    result is turned back into the model's parameterisation (``StepInfo.from_x0``). ``space="prediction"``
    applies the same equations to the raw ε / v predictions, as diffusers' ``AdaptiveProjectedGuidance``
    guider does.

    Momentum state is one running average per sample of the batch, cleared by ``reset()`` (the loop calls
    it at each denoise call, so nothing carries over between batches or runs).

    Skipping: w = 1 outputs c exactly, so the unconditional pass is skipped there, but only without momentum
    (the running average needs c - u at every step). The conditional pass is always needed except when the
    rule is plain CFG (eta = 1, r = 0, momentum = 0) and w = 0.
    """

    diffusers_class = "AdaptiveProjectedGuidance"  # the diffusers guider with the same forward (stablefused.guider_config)

    ranges = {"eta": (-100, 100), "r": (0, None), "momentum": (-1, 1)}  # |momentum| < 1: a decaying average

    def __init__(self, eta: float = 0.0, r: float = 0.0, momentum: float = 0.0,
                 space: Literal["x0", "prediction"] = "x0"):
        if space not in ("x0", "prediction"):
            raise ValueError(f"guidance.rule_params.space={space!r}: must be x0 or prediction")
        self.eta, self.r, self.momentum, self.space = float(eta), float(r), float(momentum), space
        self._avg: torch.Tensor | None = None

    def reset(self) -> None:
        self._avg = None

    def passes(self, w):
        both = torch.ones_like(w, dtype=torch.bool)
        plain = self.eta == 1 and self.r <= 0 and self.momentum == 0
        need_cond = (w != 0) if plain else both
        need_uncond = (w != 1) if self.momentum == 0 else both
        return need_cond, need_uncond

    def __call__(self, cond, uncond, w, info):
        if self.space == "x0":
            if info.model_input is None:
                raise ValueError("apg with space=x0 needs StepInfo.model_input (set by the loop)")
            out = self._apg(info.to_x0(cond.double()), info.to_x0(uncond.double()), w)
            return info.from_x0(out).to(cond.dtype)
        return self._apg(cond, uncond, w)

    def _apg(self, cond, uncond, w):
        dims = list(range(1, cond.ndim))
        diff = cond - uncond
        if self.momentum != 0:
            if self._avg is not None and self._avg.shape == diff.shape:
                diff = diff + self.momentum * self._avg
            self._avg = diff
        if self.r > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.r / norm, max=1.0)
        d, c = diff.double(), cond.double()
        c_unit = torch.nn.functional.normalize(c.flatten(1), dim=1).view_as(c)
        par = (d * c_unit).sum(dim=dims, keepdim=True) * c_unit
        update = (d - par) + self.eta * par
        return (c + (per_sample(w, c) - 1) * update).to(cond.dtype)
