import math

import torch

from stablefused.registry import register
from stablefused.walkers import Walker, slerp

STREAM = 1000  # + segment: the random steps of a segment, an extra noise stream of its first keyframe's seed


@register("walkers", "random")
class RandomWalk(Walker):
    """A random walk in noise space between keyframes (a Brownian bridge, reproducible from the seeds).

    The noise wanders by ``step`` (× the noise's std) per frame, pinned at both keyframes, and is kept at the
    slerp's norm."""

    def __init__(self, step: float = 0.15, text: str = "lerp", easing: str = "linear"):
        super().__init__(text=text, easing=easing)
        from stablefused.registry import PluginError

        if not isinstance(step, (int, float)) or isinstance(step, bool) or step < 0:
            raise PluginError(f"walker.step={step!r}: must be a number >= 0")
        self.step = float(step)
        self._bridge: tuple[int, torch.Tensor] | None = None  # (segment, bridge over its frame grid)

    def plan(self, walk, keyframes):
        self._counts = self.segment_frames(walk, keyframes)
        return super().plan(walk, keyframes)

    def bridge(self, segment: int, keys) -> torch.Tensor:
        """(n + 1, C, h, w): the walk's offset at positions k / n of the segment, 0 at both ends."""
        if self._bridge is None or self._bridge[0] != segment:
            n = self._counts[segment]
            seed = keys.seeds[segment % len(keys.seeds)]
            eps = keys.extra_noise(seed, STREAM + segment, n).double()
            eps = eps / float(keys.noise.double().std())  # unit steps whatever init_noise_sigma is
            walk = torch.cat([torch.zeros_like(eps[:1]), eps.cumsum(0)])  # S_0 .. S_n
            k = torch.arange(n + 1, dtype=torch.float64).reshape(-1, *[1] * (eps.dim() - 1))
            self._bridge = (segment, (walk - k / n * walk[-1]) * self.step)
        return self._bridge[1]

    def noise(self, frames, keys):
        k = len(keys.noise)
        out = []
        for f in frames:
            a, b = self.ends(f, k)
            base = slerp(keys.noise[a], keys.noise[b], f.position)
            if f.position in (0, 1) or self.step == 0:
                out.append(base)
                continue
            br = self.bridge(f.segment, keys)
            x = f.position * (len(br) - 1)
            i = min(int(math.floor(x)), len(br) - 2)
            off = br[i] + (br[i + 1] - br[i]) * (x - i)
            scale = float(base.double().std()) if base.numel() > 1 else 1.0
            v = base.double() + off * scale
            out.append((v * (base.double().norm() / v.norm())).to(base.dtype))
        return torch.stack(out)
