from stablefused.guidance import GuidanceSchedule
from stablefused.registry import register


def _w(base, f: float):
    """w = 1 + (b - 1) f, exactly b at f = 1 and exactly 1 at f = 0 (see ``constant``)."""
    return base if f == 1 else 1 + (base - 1) * f


def _ramp(info) -> float:
    """0 at the first loop iteration, 1 at the last (0 when there is only one)."""
    return info.index / max(1, info.num_steps - 1)


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

    def __init__(self, start: float = 0.0, end: float = 2.0):
        self.start, self.end = float(start), float(end)

    def __call__(self, base, info):
        return _w(base, self.start + (self.end - self.start) * _ramp(info))
