import torch

from stablefused.guidance import GuidanceRule, per_sample
from stablefused.registry import register


@register("guidance_rule", "cfg")
class CFG(GuidanceRule):
    """Classifier-free guidance: u + w (c - u) (Ho & Salimans 2022), any real w.

    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598), in the w = 1 + w_paper
    convention of SD pipelines: eps = eps_uncond + w * (eps_cond - eps_uncond). w = 0 gives the
    unconditional prediction and w = 1 the conditional one, so those rows skip the other UNet pass.
    """

    diffusers_class = "ClassifierFreeGuidance"  # the diffusers guider with the same forward (stablefused.guider_config)

    def passes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w != 0, w != 1

    def __call__(self, cond, uncond, w, info):
        return uncond + per_sample(w, cond) * (cond - uncond)
