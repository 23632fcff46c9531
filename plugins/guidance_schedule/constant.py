from stablefused.guidance import GuidanceSchedule
from stablefused.registry import register


@register("guidance_schedule", "constant")
class Constant(GuidanceSchedule):
    """The same scale at every step (the classic setting)."""

    def __call__(self, base, info):
        return base
