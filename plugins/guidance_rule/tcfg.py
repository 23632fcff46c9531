import torch

from stablefused.guidance import Guider, per_sample
from stablefused.registry import register


@register("guidance_rule", "tcfg")
class TCFG(Guider):
    """Tangential damping CFG: the unconditional prediction projected onto the main singular direction of
    [cond; uncond] before CFG (Kwon et al. 2025).

    Kwon, Hwang, Kim, Kim, Yoon 2025, "TCFG: Tangential Damping Classifier-free Guidance" (arXiv:2503.18137),
    per sample, with the predictions flattened to rows of a 2 × N matrix::

        [c; u] = U Σ Vᵀ                     (SVD; v₁ the first right singular vector)
        u'     = (u · v₁) v₁                 the tangential component of u removed
        out    = u' + w (c − u')

    computed in float32 as diffusers' ``TangentialClassifierFreeGuidance`` (same forward). w = 1 returns c
    (no unconditional pass), w = 0 returns u', which needs c, so the conditional pass is always made.
    """

    diffusers_class = "TangentialClassifierFreeGuidance"

    def passes(self, w):
        return torch.ones_like(w, dtype=torch.bool), w != 1

    def __call__(self, cond, uncond, w, info):
        preds = torch.stack([cond, uncond], dim=1).float().flatten(2)
        v1 = torch.linalg.svd(preds, full_matrices=False)[2][:, :1]  # (B, 1, N)
        u = uncond.float().flatten(1)[:, None]
        u_proj = ((u @ v1.transpose(-2, -1)) @ v1).reshape(uncond.shape).to(cond.dtype)
        out = u_proj + per_sample(w, cond) * (cond - u_proj)
        return torch.where(per_sample(w, cond) == 1, cond, out)
