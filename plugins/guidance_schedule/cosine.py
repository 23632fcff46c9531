import math

from stablefused.guidance import GuidanceSchedule
from stablefused.registry import register


def _w(base, f: float):
    """w = 1 + (b - 1) f, exactly b at f = 1 and exactly 1 at f = 0 (see ``constant``)."""
    return base if f == 1 else 1 + (base - 1) * f


def _ramp(info) -> float:
    """0 at the first loop iteration, 1 at the last (0 when there is only one)."""
    return info.index / max(1, info.num_steps - 1)


@register("guidance_schedule", "cosine")
class Cosine(GuidanceSchedule):
    """Guidance strength on a half cosine over the steps: factor start -> end, w = 1 + (b - 1) f.

    f = start + (end - start) * (1 - cos(pi * i / (n - 1))) / 2 for loop iteration i of n: flat at both
    ends, steepest mid-way. Same parameters and convention as ``linear`` (f = 0: conditional prediction,
    f = 1: the base scale b). The default 0 -> 2 is increasing (cf. Wang et al. 2024, "Analysis of
    Classifier-Free Guidance Weight Schedulers"), with the same mean strength over the iterations as the
    constant schedule.
    """

    def __init__(self, start: float = 0.0, end: float = 2.0):
        self.start, self.end = float(start), float(end)

    def __call__(self, base, info):
        s = (1 - math.cos(math.pi * _ramp(info))) / 2
        return _w(base, self.start + (self.end - self.start) * s)
