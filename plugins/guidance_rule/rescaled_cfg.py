import torch

from stablefused.guidance import GuidanceRule, per_sample
from stablefused.registry import register


@register("guidance_rule", "rescaled_cfg")
class RescaledCFG(GuidanceRule):
    """CFG rescaled to the conditional prediction's std, mixed by phi (Lin et al. 2023, §3.4).

    Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4 (arXiv:2305.08891)::

        x_cfg   = u + w (c - u)
        x_rescl = x_cfg * std(c) / std(x_cfg)
        x_final = phi * x_rescl + (1 - phi) * x_cfg

    std is per sample over all non-batch dimensions (torch's unbiased std, as in the paper's code; the
    ratio does not depend on the correction). The paper applies it to v-prediction outputs; here it acts on
    whatever the model predicts (epsilon or v), as diffusers' ``guidance_rescale`` does. phi = 0 is plain
    CFG; the paper uses phi = 0.7. If std(x_cfg) = 0 the ratio is taken as 1.

    Skipping: w = 1 gives x_cfg = c, ratio 1, output c, so the unconditional pass is skipped at w = 1. At w
    = 0 the output is u rescaled to std(c), which needs the conditional pass (unless phi = 0).
    """

    diffusers_class = "ClassifierFreeGuidance"  # the diffusers guider with the same forward (stablefused.guider_config)

    ranges = {"phi": (0, 1)}

    def __init__(self, phi: float = 0.7):
        self.phi = float(phi)

    def passes(self, w):
        need_cond = (w != 0) if self.phi == 0 else torch.ones_like(w, dtype=torch.bool)
        return need_cond, w != 1

    def __call__(self, cond, uncond, w, info):
        x_cfg = uncond + per_sample(w, cond) * (cond - uncond)
        dims = list(range(1, cond.ndim))
        std_c = cond.std(dim=dims, keepdim=True)
        std_cfg = x_cfg.std(dim=dims, keepdim=True)
        ratio = torch.where(std_cfg > 0, std_c / std_cfg, torch.ones_like(std_cfg))
        return self.phi * (x_cfg * ratio) + (1 - self.phi) * x_cfg
