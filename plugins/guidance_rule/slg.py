from typing import Literal

from stablefused.guidance import PerturbedGuider
from stablefused.registry import register


@register("guidance_rule", "slg")
class SLG(PerturbedGuider):
    """Skip-layer guidance (Stability AI, SD 3.5; Hyung et al. 2024), with CFG.

    As ``StableDiffusion3Pipeline(skip_guidance_layers=...)`` and Hyung et al. 2024, "Spatiotemporal Skip
    Guidance for Enhanced Video Diffusion Sampling" (arXiv:2411.18664), eq. 6::

        ε̃ = ε(x|∅) + w (ε(x|c) − ε(x|∅)) + s (ε(x|c) − ε_skip(x|c))

    ε_skip: the network with the blocks in ``layers`` skipped (``perturbation=skip_blocks``). Defaults as
    diffusers' ``SkipLayerGuidance``: s = 2.8, start 0.01, stop 0.2; layers per family (blocks 7, 8, 9 on
    SD3, the mid block on UNets). Its forward equals diffusers' for w ≠ 1.

    ``window`` says how the steps of the window are counted (i: the loop iteration, n: the iterations):

    * ``"guider"`` (default): diffusers' ``SkipLayerGuidance`` guider class, ``int(start·n) < i < int(stop·n)``,
      the term on every row (w = 1: c + s (c − ε_skip));
    * ``"pipeline"``: ``StableDiffusion3Pipeline`` and Stability AI's SD 3.5 reference sampler,
      ``start·n < i < stop·n`` (one more step than the guider when stop·n is not an integer), and the term
      only on rows with w > 1 (the pipeline runs the skip-layer pass only under CFG, guidance_scale > 1).
    """

    perturbation = "skip_blocks"
    diffusers_class = "SkipLayerGuidance"
    ranges = {"start": (0, 1), "stop": (0, 1)}

    def __init__(self, scale: float = 2.8, layers: list | None = None, start: float | None = 0.01,
                 stop: float | None = 0.2, rescale: float = 0.0, window: Literal["guider", "pipeline"] = "guider"):
        super().__init__(scale, start, stop, rescale, layers=layers)
        self.window = window

    def active(self, info):
        if self.window == "guider" or (self.start is None and self.stop is None):
            return super().active(info)
        n, i = info.num_steps, info.index
        return self.scale != 0 and (self.start or 0.0) * n < i < (1.0 if self.stop is None else self.stop) * n

    def term_rows(self, w):
        return None if self.window == "guider" else w > 1
