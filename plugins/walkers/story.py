import math
from pathlib import Path

from stablefused.registry import PluginError, register
from stablefused.walkers import Frame, Keyframe, Walker


def read_story(path: str | Path) -> list[tuple[float, str, str]]:
    """Scenes of a story file: one per line, ``seconds | prompt | caption`` (caption optional; blank lines
    and lines starting with # skipped). A bad line raises ValueError naming the line and the fix."""
    scenes = []
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"story={path}: is a folder; give a text file of scenes 'seconds | prompt | caption'")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Notepad)
        data = data[3:]
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"story={path}: line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1}); save the file as UTF-8") from None
        if "\x00" in line:
            raise ValueError(f"story={path}: line {n} holds NUL bytes: not a text file; give a text file of scenes")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) not in (2, 3):
            raise ValueError(f"story={path}: line {n}: expected 'seconds | prompt | caption', got {line.strip()!r}")
        try:
            seconds = float(parts[0])
        except ValueError:
            raise ValueError(f"story={path}: line {n}: seconds {parts[0]!r} is not a number") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"story={path}: line {n}: seconds={parts[0]} must be a finite number > 0")
        if not parts[1]:
            raise ValueError(f"story={path}: line {n}: empty prompt")
        scenes.append((seconds, parts[1], parts[2] if len(parts) == 3 else ""))
    if not scenes:
        raise ValueError(f"story={path}: no scenes; write one per line as 'seconds | prompt | caption'")
    return scenes


@register("walkers", "story")
class Story(Walker):
    """Scenes from a story file ('seconds | prompt | caption' per line); captions burned in and in walk.srt.

    ``story=path``: scene i is on screen for its seconds (at fps), the last one too, so the walk lasts the
    story's total. A scene is "on screen" while its keyframe dominates the picture (prompt weight > 0.5), and
    its caption is shown exactly then: each transition to the next scene crosses half way where the next
    scene's time starts. A scene's own picture (its keyframe) is its middle frame; an open walk starts on the
    first scene's picture and ends on the last one's. The story sets the pacing (``pacing=even`` does not
    apply)."""

    paces_itself = True

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

    def check_walk(self, walk, keyframes, problems):
        super().check_walk(walk, keyframes, problems)
        for i, k in enumerate(keyframes, 1):  # every scene, the last one too, lasts its seconds
            if k.seconds * walk.fps < 0.5:  # it would still get one frame: the video would not last the story
                problems.append(f"story={walk.story}: scene {i} ({k.prompt[:40]!r}) lasts {k.seconds:g} s, less than "
                                f"one frame at walk_fps={walk.fps:g} ({1 / walk.fps:g} s); lengthen it or raise walk_fps")
                break

    def segment_frames(self, walk, keyframes):
        starts = self.scene_starts(walk, keyframes)
        return [b - a for a, b in zip(starts, starts[1:])]

    @staticmethod
    def scene_starts(walk, keyframes) -> list[int]:
        """First frame of each scene, and the frame count last: round(cumulative seconds x fps), each scene at
        least one frame."""
        starts, t = [0], 0.0
        for k in keyframes:
            t += k.seconds
            starts.append(max(starts[-1] + 1, round(t * walk.fps)))
        return starts

    def plan(self, walk, keyframes):
        starts = self.scene_starts(walk, keyframes)
        n, k = starts[-1], len(keyframes)
        loop = walk.loop or self.closed
        # the frame of each scene's own picture: the middle of its frames (an open walk's ends: first and last)
        at = [a + (b - a) // 2 for a, b in zip(starts, starts[1:])]
        if not loop:
            at[0], at[-1] = 0, n - 1
        frames = []
        for j in range(n):
            scene = max(i for i in range(k) if starts[i] <= j)
            if j >= at[scene] or (not loop and scene == 0):
                s, x = scene, j  # from this scene's picture towards the next
            else:
                s, x = (scene - 1) % k, j + (n if scene == 0 else 0)  # arriving from the previous scene
            if not loop and s == k - 1:  # an open walk's last frame: the end of the last segment
                frames.append(Frame(j, k - 2, 1.0) if k > 1 else Frame(j, 0, 0.0))
            else:
                a, b = at[s], at[s + 1] if s + 1 < k else at[0] + n
                half = starts[s + 1] - 0.5  # where the picture is half one scene, half the next
                u = 0.5 * (x - a) / (half - a) if x < half else 0.5 + 0.5 * (x - half) / (b - half)
                frames.append(Frame(j, s, float(u)))
            frames[-1].time = j / float(walk.fps)
            frames[-1].meta["caption"] = keyframes[scene].caption
        return frames
