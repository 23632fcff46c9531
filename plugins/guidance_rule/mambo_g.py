import torch

from stablefused.guidance import Guider, per_sample
from stablefused.registry import register


@register("guidance_rule", "mambo_g")
class MAMBOG(Guider):
    """Magnitude-aware guidance: the CFG scale damped where the guidance update is large relative to the
    unconditional prediction (MAMBO-G).

    "MAMBO-G: Magnitude-Aware Mitigation for Boosted Guidance" (arXiv:2508.03442), per sample over all
    non-batch dimensions::

        r   = ||c − u|| / ||u||
        w'  = 1 + (w − 1) exp(−α r)
        out = u + w' (c − u)

    Same forward as diffusers' ``MagnitudeAwareGuidance`` (its defaults: w = 10, α = 8). w = 1 gives c (no
    unconditional pass); w = 0 gives u + (1 − exp(−α r))(c − u), which needs c.
    """

    diffusers_class = "MagnitudeAwareGuidance"
    ranges = {"alpha": (0, None)}

    def __init__(self, alpha: float = 8.0):
        self.alpha = float(alpha)

    def passes(self, w):
        return torch.ones_like(w, dtype=torch.bool), w != 1

    def __call__(self, cond, uncond, w, info):
        dims = list(range(1, cond.ndim))
        diff = cond - uncond
        norm = torch.linalg.vector_norm
        ratio = norm(diff, dim=dims, keepdim=True) / norm(uncond, dim=dims, keepdim=True)
        w_eff = 1.0 + (per_sample(w, cond) - 1.0) * torch.exp(-self.alpha * ratio)
        return uncond + w_eff * diff
