from stablefused.guidance import GuidanceSchedule, ramp, strength
from stablefused.registry import register


@register("guidance_schedule", "linear")
class Linear(GuidanceSchedule):
    """Guidance strength changed linearly over the steps: factor start -> end, w = 1 + (b - 1) f.

    f = start + (end - start) * i / (n - 1) for loop iteration i of n (f = start at the first iteration,
    f = end at the last). The factor scales the guidance strength (b - 1) of each sample's base scale b
    (``guidance_scales``), so one schedule serves every column of a guidance sweep; f = 0 means the
    conditional prediction (w = 1), f = 1 the base scale. The default 0 -> 2 is an increasing schedule, which
    Wang et al. 2024 ("Analysis of Classifier-Free Guidance Weight Schedulers") found to beat constant
    guidance: low guidance while the layout forms, high at the end, with the same mean strength over the
    iterations as the constant schedule.
    """

    ranges = {"start": (-100, 100), "end": (-100, 100)}  # strength factors; |f| > 100 only overflows

    def __init__(self, start: float = 0.0, end: float = 2.0):
        self.start, self.end = float(start), float(end)

    def __call__(self, base, info):
        return strength(base, self.start + (self.end - self.start) * ramp(info))
