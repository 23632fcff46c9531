import math

from stablefused.guidance import GuidanceSchedule, ramp, strength
from stablefused.registry import register


@register("guidance_schedule", "cosine")
class Cosine(GuidanceSchedule):
    """Guidance strength on a half cosine over the steps: factor start -> end, w = 1 + (b - 1) f.

    f = start + (end - start) * (1 - cos(pi * i / (n - 1))) / 2 for loop iteration i of n: flat at both
    ends, steepest mid-way. Same parameters and convention as ``linear`` (f = 0: conditional prediction,
    f = 1: the base scale b). The default 0 -> 2 is increasing (cf. Wang et al. 2024, "Analysis of
    Classifier-Free Guidance Weight Schedulers"), with the same mean strength over the iterations as the
    constant schedule.
    """

    ranges = {"start": (-100, 100), "end": (-100, 100)}  # strength factors; |f| > 100 only overflows

    def __init__(self, start: float = 0.0, end: float = 2.0):
        self.start, self.end = float(start), float(end)

    def __call__(self, base, info):
        s = (1 - math.cos(math.pi * ramp(info))) / 2
        return strength(base, self.start + (self.end - self.start) * s)
