from stablefused.guidance import PerturbedGuider
from stablefused.registry import register


@register("guidance_rule", "pag")
class PAG(PerturbedGuider):
    """Perturbed-attention guidance (Ahn et al. 2024), with CFG.

    Ahn, Cho, Min, Jang, Kim, Kim, Park, Jin, Kim 2024, "Self-Rectifying Diffusion Sampling with
    Perturbed-Attention Guidance" (arXiv:2403.17377), eq. 11 with CFG as in ``StableDiffusionPAGPipeline``::

        ε̃ = ε(x|∅) + w (ε(x|c) − ε(x|∅)) + s (ε(x|c) − ε̂(x|c))

    ε̂: the network with self-attention maps replaced by the identity (``perturbation=identity_attention``)
    in ``layers`` (default per family: the mid block on SD 1.x/2.x/SDXL, the pipelines' ``["mid"]``). The
    perturbed rows run inside the same network call as the others. Defaults: s = 3.0 (``pag_scale``), every
    step, as ``StableDiffusionPAGPipeline``; w is the run's guidance scale (schedules apply to it). diffusers'
    ``PerturbedAttentionGuidance`` guider has the same forward (its perturbed window counts
    ``int(start·n) < i < int(stop·n)``; set ``start``/``stop`` to use one).
    """

    perturbation = "identity_attention"
    diffusers_class = "PerturbedAttentionGuidance"
    ranges = {"start": (0, 1), "stop": (0, 1)}

    def __init__(self, scale: float = 3.0, layers: list | None = None, start: float | None = None,
                 stop: float | None = None, rescale: float = 0.0):
        super().__init__(scale, start, stop, rescale, layers=layers)
