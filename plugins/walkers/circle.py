import math

import torch

from stablefused.registry import register
from stablefused.walkers import Walker, check_choice

STREAM = 1  # the second axis b of the circle: an extra noise stream of the first keyframe's seed


@register("walkers", "circle")
class Circle(Walker):
    """A closed loop in noise space around the first keyframe: x = cos θ·a + sin θ·b, θ from 0 to 2π.

    Always loops. ``b`` is an extra noise stream of the first keyframe's seed. The prompt stays the first
    keyframe's (text=fixed) or is interpolated through the keyframes (lerp|slerp)."""

    closed = True
    min_keyframes = 1

    def __init__(self, text: str = "fixed", easing: str = "linear"):
        check_choice(text, ("fixed", "lerp", "slerp"), "walker.text")
        super().__init__(text="lerp" if text == "fixed" else text, easing=easing)
        self.fixed = text == "fixed"

    def plan(self, walk, keyframes):
        frames = super().plan(walk, keyframes)
        n = len(frames)
        for f in frames:
            f.meta["angle"] = round(360.0 * f.index / n, 6) if n else 0.0
        self._segments = self.segments(walk, keyframes)
        return frames

    def theta(self, frame) -> float:
        return 2 * math.pi * (frame.segment + frame.position) / self._segments

    def noise(self, frames, keys):
        a = keys.noise[0]
        b = keys.extra_noise(keys.seeds[0], STREAM, 1)[0]
        out = []
        for f in frames:
            th = self.theta(f)
            out.append(a.clone() if th == 0 else a * math.cos(th) + b * math.sin(th))
        return torch.stack(out)

    def text(self, frames, keys):
        if self.fixed:
            return keys.cond[:1].expand(len(frames), *keys.cond.shape[1:]).clone()
        return super().text(frames, keys)

    def prompt_weights(self, frame, k):
        return ([0], [1.0]) if self.fixed else super().prompt_weights(frame, k)
