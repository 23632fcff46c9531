from stablefused.guidance import GuidanceSchedule
from stablefused.registry import register


@register("guidance_schedule", "constant")
class Constant(GuidanceSchedule):
    """The same scale at every step (the classic setting): w = b, the sample's base scale.

    Every other schedule is written against the same convention: a strength factor f(step) applied around
    the conditional prediction, w = 1 + (b - 1) * f, so f = 1 is this schedule and f = 0 is "no guidance"
    (w = 1, the conditional prediction; the cfg rule then skips the unconditional UNet pass).
    """

    def __call__(self, base, info):
        return base
