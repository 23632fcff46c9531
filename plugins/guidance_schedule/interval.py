from stablefused.guidance import GuidanceSchedule, strength
from stablefused.registry import register


@register("guidance_schedule", "interval")
class Interval(GuidanceSchedule):
    """Guidance only inside a noise-level interval (Kynkäänniemi et al. 2024), conditional outside.

    Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution
    quality in diffusion models" (arXiv:2404.07724), guided denoiser::

        D(x; sigma) = D(x; sigma | c) + (w - 1) (D(x; sigma | c) - D(x; sigma))   if sigma in (sigma_lo, sigma_hi]
        D(x; sigma) = D(x; sigma | c)                                               otherwise

    i.e. w = b (the base scale) inside the interval and w = 1 (the conditional prediction, not the
    unconditional one) outside, so the cfg rule skips the unconditional pass there. sigma is the loop's
    noise level in the same x = x0 + sigma * eps convention as the paper (EDM), so the paper's values carry
    over: the defaults (0.28, 5.42] are the paper's interval for SD-XL; SD 1.x spans sigma ~0.03..14.6.
    The interval is open below and closed above, as in the paper.
    """

    ranges = {"sigma_lo": (0, None), "sigma_hi": (0, None)}

    @classmethod
    def check(cls, params):
        lo, hi = params["sigma_lo"], params["sigma_hi"]
        return [f"sigma_lo={lo}: must be below sigma_hi={hi} (the interval is (sigma_lo, sigma_hi])"] if lo >= hi else []

    def __init__(self, sigma_lo: float = 0.28, sigma_hi: float = 5.42):
        if sigma_lo >= sigma_hi:
            raise ValueError(f"interval: sigma_lo={sigma_lo} >= sigma_hi={sigma_hi}")
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)

    def __call__(self, base, info):
        inside = self.sigma_lo < float(info.sigma) <= self.sigma_hi
        return strength(base, 1.0 if inside else 0.0)
