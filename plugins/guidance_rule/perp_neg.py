import torch

from stablefused.guidance import COND, NEGATIVE, UNCOND, Guider, per_sample
from stablefused.registry import register


@register("guidance_rule", "perp_neg")
class PerpNeg(Guider):
    """Perpendicular negative prompt: only the part of the negative prompt's direction that is perpendicular
    to the prompt's direction is removed (Armandpour et al. 2023).

    Armandpour, Sadeghian, Zheng, Sadeghian, Zhou 2023, "Re-imagine the Negative Prompt Algorithm: Transform
    2D Diffusion into 3D, alleviate Janus problem and Beyond" (arXiv:2304.04968), their Perp-Neg guidance with one
    negative prompt, per sample over all non-batch dimensions::

        d_c = ε(x|c) − ε(x|∅),   d_n = ε(x|n) − ε(x|∅)
        d_n⊥ = d_n − (<d_n, d_c> / ||d_c||²) d_c
        ε̃  = ε(x|∅) + w d_c − s d_n⊥                      (w: the run's scale, s: ``neg_scale``)

    ∅ is the empty prompt and n the run's negative prompt (``uses_negative``: the loop gets both). w and s
    are independent as in the paper (ComfyUI's PerpNeg node multiplies the negative term by w too);
    s = 0 is plain CFG against the empty prompt (no negative pass). ||d_c|| = 0 leaves d_n whole.
    """

    uses_negative = True

    def __init__(self, neg_scale: float = 1.0):
        self.neg_scale = float(neg_scale)

    def needs(self, w, info):
        everyone = torch.ones_like(w, dtype=torch.bool)
        if self.neg_scale == 0:
            return {COND: w != 0, UNCOND: w != 1, NEGATIVE: ~everyone}
        return {COND: everyone, UNCOND: everyone, NEGATIVE: everyone}

    def combine(self, p, w, info):
        c, u, n = p[COND], p[UNCOND], p[NEGATIVE]
        out = u + per_sample(w, c) * (c - u)
        if self.neg_scale == 0:
            return out
        dc, dn = (c - u).flatten(1).double(), (n - u).flatten(1).double()
        denom = dc.pow(2).sum(1, keepdim=True)
        coef = torch.where(denom > 0, (dn * dc).sum(1, keepdim=True) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        perp = (dn - coef * dc).view_as(c).to(c.dtype)
        return out - self.neg_scale * perp
