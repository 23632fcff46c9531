from stablefused.guidance import GuidanceSchedule, strength
from stablefused.registry import register


@register("guidance_schedule", "cutoff")
class Cutoff(GuidanceSchedule):
    """CFG for the first ``frac`` of the loop iterations, then the conditional prediction only (w = 1).

    w = b while i / n < frac (iteration i of n), w = 1 afterwards. With the cfg rule the unconditional UNet
    pass is skipped from the cutoff on: frac = 0.5 evaluates 25% fewer UNet rows than constant guidance.
    frac = 1 is the constant schedule, frac = 0 no guidance at all.
    """

    ranges = {"frac": (0, 1)}

    def __init__(self, frac: float = 0.5):
        self.frac = float(frac)

    def __call__(self, base, info):
        return strength(base, 1.0 if info.progress < self.frac else 0.0)
