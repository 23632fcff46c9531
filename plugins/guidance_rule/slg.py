from stablefused.guidance import PerturbedGuider
from stablefused.registry import register


@register("guidance_rule", "slg")
class SLG(PerturbedGuider):
    """Skip-layer guidance (Stability AI, SD 3.5; Hyung et al. 2024), with CFG.

    As ``StableDiffusion3Pipeline(skip_guidance_layers=...)`` and Hyung et al. 2024, "Spatiotemporal Skip
    Guidance for Enhanced Video Diffusion Sampling" (arXiv:2411.18664), eq. 6::

        ε̃ = ε(x|∅) + w (ε(x|c) − ε(x|∅)) + s (ε(x|c) − ε_skip(x|c))

    ε_skip: the network with the blocks in ``layers`` skipped (``perturbation=skip_blocks``). Defaults as
    diffusers' ``SkipLayerGuidance``: s = 2.8, on for int(0.01·n) < i < int(0.2·n); layers per family
    (blocks 7, 8, 9 on SD3, the mid block on UNets). Its forward equals diffusers' for w ≠ 1.
    """

    perturbation = "skip_blocks"
    diffusers_class = "SkipLayerGuidance"
    ranges = {"start": (0, 1), "stop": (0, 1)}

    def __init__(self, scale: float = 2.8, layers: list | None = None, start: float | None = 0.01,
                 stop: float | None = 0.2, rescale: float = 0.0):
        super().__init__(scale, start, stop, rescale, layers=layers)
