from stablefused.guidance import GuidanceSchedule, strength
from stablefused.registry import register


@register("guidance_schedule", "warmup")
class Warmup(GuidanceSchedule):
    """Guidance strength ramped linearly from ``start`` to full over the first ``frac`` of the iterations.

    f = start + (1 - start) * i / (frac * n) while i / n < frac, then f = 1; w = 1 + (b - 1) f. With the
    default start = 0 the first iteration is conditional only (w = 1, the unconditional pass is skipped) and
    guidance reaches the base scale b at iteration frac * n.
    """

    ranges = {"frac": (0, 1), "start": (-100, 100)}

    def __init__(self, frac: float = 0.25, start: float = 0.0):
        self.frac, self.start = float(frac), float(start)

    def __call__(self, base, info):
        if self.frac <= 0 or info.progress >= self.frac:
            return base
        return strength(base, self.start + (1 - self.start) * info.progress / self.frac)
