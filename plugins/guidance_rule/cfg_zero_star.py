import torch

from stablefused.guidance import GuidanceRule, per_sample
from stablefused.registry import register


@register("guidance_rule", "cfg_zero_star")
class CFGZeroStar(GuidanceRule):
    """CFG with an optimised per-sample scale on the unconditional prediction and zero-init (Fan et al. 2025).

    Fan, Zheng, Zheng, Chen 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models"
    (arXiv:2503.18886), per sample over all non-batch dimensions::

        s*  = <c, u> / ||u||^2            (+1e-8 in the denominator, as in the authors' code)
        out = s* u + w (c - s* u)
        out = 0  for the first ``zero_steps`` loop iterations (zero-init)

    The paper targets flow-matching velocity models, where a zero prediction means "do not move". For
    SD 1.x/2.x (epsilon or v prediction) the rule is applied to the model's prediction as is (like diffusers'
    ``ClassifierFreeZeroStarGuidance``), but zero-init then does not mean standing still (epsilon = 0 gives
    x̂0 = x_t / sqrt(alpha_bar)), so it is off by default (zero_steps = 0); the authors' code zeroes
    iterations i <= zero_steps, here i < zero_steps.

    Skipping: at w = 1 the output is c exactly (the s* u terms cancel), so the unconditional pass is
    skipped; the conditional pass is always needed (s* depends on c).
    """

    diffusers_class = "ClassifierFreeZeroStarGuidance"  # the diffusers guider with the same forward (stablefused.guider_config)

    ranges = {"zero_steps": (0, None)}

    def __init__(self, zero_steps: int = 0):
        self.zero_steps = int(zero_steps)

    def passes(self, w):
        return torch.ones_like(w, dtype=torch.bool), w != 1

    def __call__(self, cond, uncond, w, info):
        if info.index < self.zero_steps:
            return torch.zeros_like(cond)
        c, u = cond.flatten(1), uncond.flatten(1)
        s = (c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)
        su = per_sample(s, cond) * uncond
        return su + per_sample(w, cond) * (cond - su)
