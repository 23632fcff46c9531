import math

from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

from stablefused.perturbations import Perturbation
from stablefused.registry import register


@register("perturbation", "blurred_queries")
class BlurredQueries(Perturbation):
    """Self-attention with Gaussian-blurred queries (SEG's perturbation).

    Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of
    Attention" (arXiv:2408.00760): the queries Q (as a square image of tokens) are blurred with a 2-D Gaussian
    of std ``sigma`` before the attention scores, which smooths the attention energy landscape; ``sigma``
    above ``sigma_inf`` means the limit σ → ∞ (every query replaced by the mean query). The blur is diffusers'
    (``_gaussian_blur_2d``, from the paper's code, applied to the output of ``to_q``; kernel size
    ⌈6σ⌉ + 1 rounded to odd). Defaults follow diffusers' ``SmoothedEnergyGuidance``: σ = 9999999 (∞).
    """

    ranges = {"sigma": (0, None)}

    def __init__(self, layers: list | None = None, sigma: float = 9999999.0, sigma_inf: float = 9999.0):
        super().__init__(layers)
        self.sigma, self.sigma_inf = float(sigma), float(sigma_inf)

    def _blur(self, _module, _inputs, q):
        size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
        return _gaussian_blur_2d(q, size, self.sigma, self.sigma_inf)

    def forward(self, module, original, args, kwargs):
        handle = module.to_q.register_forward_hook(self._blur)
        try:
            return original(*args, **kwargs)
        finally:
            handle.remove()
