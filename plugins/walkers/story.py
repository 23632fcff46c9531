from pathlib import Path

from stablefused.registry import PluginError, register
from stablefused.walkers import Keyframe, Walker


def read_story(path: str | Path) -> list[tuple[float, str, str]]:
    """Scenes of a story file: one per line, ``seconds | prompt | caption`` (caption optional; blank lines
    and lines starting with # skipped). A bad line raises ValueError naming the line and the fix."""
    scenes = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) not in (2, 3):
            raise ValueError(f"story={path}: line {n}: expected 'seconds | prompt | caption', got {line.strip()!r}")
        try:
            seconds = float(parts[0])
        except ValueError:
            raise ValueError(f"story={path}: line {n}: seconds {parts[0]!r} is not a number") from None
        if not seconds > 0:
            raise ValueError(f"story={path}: line {n}: seconds must be > 0")
        if not parts[1]:
            raise ValueError(f"story={path}: line {n}: empty prompt")
        scenes.append((seconds, parts[1], parts[2] if len(parts) == 3 else ""))
    if not scenes:
        raise ValueError(f"story={path}: no scenes; write one per line as 'seconds | prompt | caption'")
    return scenes


@register("walkers", "story")
class Story(Walker):
    """Scenes from a story file ('seconds | prompt | caption' per line); captions burned in and in walk.srt.

    ``story=path``: each scene's seconds (at fps) lead to the next scene."""

    def __init__(self, text: str = "slerp", easing: str = "cosine", caption_size: float = Walker.caption_size):
        super().__init__(text=text, easing=easing)
        if not isinstance(caption_size, (int, float)) or not 0 < caption_size < 1:
            raise PluginError(f"walker.caption_size={caption_size!r}: must be a fraction of the frame height, in (0, 1)")
        self.caption_size = float(caption_size)

    def keyframes(self, walk):
        if not walk.story:
            raise ValueError("story: not set; walker=story reads its scenes from story=path/to/story.txt "
                             "(lines 'seconds | prompt | caption')")
        scenes = read_story(walk.story)
        seeds = list(walk.seeds)
        if len(seeds) == 1:
            seeds = seeds * len(scenes)
        if len(seeds) != len(scenes):
            raise ValueError(f"seeds: {len(seeds)} seeds for the {len(scenes)} scenes of story={walk.story}; give "
                             "one seed, or one per scene")
        return [Keyframe(p, s, caption=c, seconds=t) for (t, p, c), s in zip(scenes, seeds)]

    def segment_frames(self, walk, keyframes):
        return [max(1, round(k.seconds * walk.fps)) for k in keyframes[: self.segments(walk, keyframes)]]

    def plan(self, walk, keyframes):
        frames = super().plan(walk, keyframes)
        for f in frames:
            k = keyframes[f.segment if f.position < 1 else (f.segment + 1) % len(keyframes)]
            f.meta["caption"] = k.caption
        return frames
