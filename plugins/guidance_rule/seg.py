from stablefused.guidance import PerturbedGuider
from stablefused.registry import register


@register("guidance_rule", "seg")
class SEG(PerturbedGuider):
    """Smoothed energy guidance (Hong 2024), with CFG.

    Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of
    Attention" (arXiv:2408.00760), eq. 9 with CFG as in the author's SEG-SDXL pipeline::

        ε̃ = ε(x|∅) + w (ε(x|c) − ε(x|∅)) + s (ε(x|c) − ε̃_σ(x|c))

    ε̃_σ: the network with its self-attention queries blurred by a Gaussian of std ``sigma``
    (``perturbation=blurred_queries``; σ ≥ ``sigma_inf`` means σ → ∞, the paper's recommended limit).
    Defaults as diffusers' ``SmoothedEnergyGuidance``: s = 2.8, σ = 9999999, every step; layers: the mid
    block on UNets (the paper's SDXL setting). Its forward equals diffusers' for w ≠ 1.
    """

    perturbation = "blurred_queries"
    diffusers_class = "SmoothedEnergyGuidance"
    ranges = {"start": (0, 1), "stop": (0, 1), "sigma": (0, None)}

    def __init__(self, scale: float = 2.8, sigma: float = 9999999.0, sigma_inf: float = 9999.0,
                 layers: list | None = None, start: float | None = None, stop: float | None = None,
                 rescale: float = 0.0):
        super().__init__(scale, start, stop, rescale, layers=layers, sigma=sigma, sigma_inf=sigma_inf)
