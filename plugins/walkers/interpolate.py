from stablefused.registry import register
from stablefused.walkers import Walker


@register("walkers", "interpolate")
class Interpolate(Walker):
    """Keyframe to keyframe: noise by slerp, text embedding by lerp or slerp (text=), easing linear|cosine."""

    def __init__(self, text: str = "slerp", easing: str = "linear"):
        super().__init__(text=text, easing=easing)
