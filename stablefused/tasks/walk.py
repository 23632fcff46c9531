"""``task=walk``: latent walks. Keyframes (prompt i, seed i) become a sequence of frames whose initial noise and
text embedding move along a path chosen by the walker plugin (``walker=<name>``, :mod:`stablefused.walkers`),
rendered through the one loop in chunks of ``batch_size`` and written as ``frames/000000.png …`` (one
``type: frame`` manifest line each) and ``walk.mp4`` (H.264, yuv420p).

* Each keyframe prompt is encoded once and each keyframe seed's noise drawn once, as text-to-image does, so the
  frame at a keyframe is that prompt and seed's text-to-image image.
* A frame depends only on the config and its index (its noise, embedding and scheduler generator are made
  per frame), so chunks of 1 or 8 give the same frames and an interrupted walk, run again into its run dir,
  continues from the first missing frame and ends with the same video.
* Frames are written as they are made and not kept in memory (``Run.keep_images = False``); the video is
  streamed from the PNGs, one frame at a time.
* ``pacing=even``: each segment's positions are moved so that consecutive frames differ equally; the change
  is measured on low-step previews on a fine grid of positions (``pacing.json`` keeps the result, so a
  resumed walk uses the same positions).
"""

from __future__ import annotations

import json
import logging
from numbers import Real
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from stablefused import registry
from stablefused.pacing import even_pacing
from stablefused.runs import Run, image_record, image_size, metric_keys, summarise_metrics
from stablefused.tasks import Task, register_task
from stablefused.video import mux_audio, video_frame, video_size, write_gif, write_mp4, write_srt
from stablefused.walk_render import make_keys, render
from stablefused.walk_settings import _number, make_walker, resolve_file, walk_settings
from stablefused.walkers import Frame, Walk, Walker

log = logging.getLogger(__name__)
PACINGS = ("uniform", "even")
MAX_WALK_FRAMES = 100_000  # frames of one walk (2.3 hours at 12 fps): beyond this a typo, not a plan


def walk_video(run: Run, walker: Walker, walk: Walk, records: list[dict]) -> Path:
    """walk.mp4 from the frame PNGs, streamed one frame at a time (H.264, yuv420p); captions burned in; the
    walker's soundtrack muxed in."""
    h, w = image_size(run.cfg)
    scale, height, width = video_size(h, w)
    caption_size = float(walker.caption_size)
    sound = walker.soundtrack(walk)
    path = run.path("walk.mp4")
    silent = path.with_name("walk.video.mp4") if sound else path
    write_mp4(silent, (video_frame(run.run_dir / rec["path"], scale, height, width, rec.get("caption"), caption_size)
                       for rec in records), walk.fps)
    if sound:
        mux_audio(silent, *sound, path)
        silent.unlink()
    return path


# --------------------------------------------------------------------------------------------- task
@register_task("walk")
class WalkTask(Task):
    """Latent walk: keyframes (prompt, seed) → frames along a walker's path → frames/*.png and walk.mp4."""

    types = {"walk_fps": Real, "story": Optional[str], "audio": Optional[str], "audio_start": Real,
             "audio_duration": Optional[Real]}
    output_type = "frame"
    input_settings = ("story", "audio")

    def input_files(self, cfg: Any, key: str) -> list:
        path = resolve_file(cfg.get(key))  # relative paths: the working directory, then the shipped conf/
        return [path] if path is not None else []

    def validate(self, cfg: Any, problems: list[str]) -> None:
        before = len(problems)
        frames = cfg.segment_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            problems.append(f"segment_frames={frames!r}: must be an integer >= 1 (frames from one keyframe to the next)")
        for key in ("loop", "gif"):
            if not isinstance(cfg.get(key), bool):
                problems.append(f"{key}={cfg.get(key)!r}: must be true or false")
        for msg in (_number(cfg, "walk_fps", 0, strict=True), _number(cfg, "audio_start", 0, strict=False),
                    _number(cfg, "audio_duration", 0, strict=True, allow_none=True)):
            if msg:
                problems.append(msg)
        if cfg.pacing not in PACINGS:
            problems.append(f"pacing={cfg.pacing!r}: must be uniform or even")
        if len(cfg.guidance_scales) != 1:
            problems.append(f"guidance_scales={list(cfg.guidance_scales)}: a walk uses one guidance scale; give one, "
                            "e.g. guidance_scales=[7.5]")
        if len(problems) > before:
            return  # a number of the walk is wrong: the walker cannot plan it yet
        name = cfg.walker.get("name") if cfg.get("walker") else None
        for key, owner in (("story", "story"), ("audio", "audio")):
            if cfg.get(key) is not None and name != owner:
                problems.append(f"{key}={cfg.get(key)}: only walker={owner} reads it; add walker={owner}")
            elif cfg.get(key) is not None and not resolve_file(cfg.get(key)).is_file():
                found = resolve_file(cfg.get(key))
                problems.append(f"{key}={cfg.get(key)}: " + ("is a folder; give a file" if found.is_dir() else "no such file"))
        if len(problems) > before:
            return  # the story/audio file is missing or a folder: said once, not again by the walker
        try:
            walker = make_walker(cfg)
            walk = walk_settings(cfg)
            keyframes = walker.keyframes(walk)
        except (registry.PluginError, ValueError, OSError) as e:
            problems.append(str(e))
            return
        if cfg.pacing == "even" and walker.paces_itself:
            problems.append(f"pacing=even: walker={name} sets its own pacing; use pacing=uniform")
        if walker.makes_frames and cfg.get("recorders") and registry.selected(cfg, "recorders"):
            problems.append(f"recorders: walker={name} makes its frames without the denoising loop (crops between "
                            "keyframes it paints itself): nothing to record; drop the recorders")
        walker.check_walk(walk, keyframes, problems)
        if keyframes:  # a bound, also for walkers that pace themselves (story: its scenes' frames)
            total = sum(walker.segment_frames(walk, keyframes)) + 1
            if total > MAX_WALK_FRAMES:
                src = (f"story={cfg.story} at walk_fps={cfg.walk_fps:g}" if name == "story"
                       else f"segment_frames={cfg.segment_frames}")
                problems.append(f"{src}: {total:,} frames in all, more than {MAX_WALK_FRAMES:,} (hours of video, "
                                "days of sampling); use fewer or shorter scenes, fewer frames or a lower walk_fps")

    def run(self, run: Run) -> None:
        cfg = run.cfg
        run.keep_images = False  # frames are written as made; memory does not grow with the walk's length
        walker, walk = make_walker(cfg), walk_settings(cfg)
        keyframes = walker.keyframes(walk)
        frames = walker.plan(walk, keyframes)
        assert [f.index for f in frames] == list(range(len(frames))), "a walker's plan must number frames 0..n-1"
        h, w = image_size(cfg)
        keys = make_keys(run, keyframes, h, w)
        uncond = run.sampler.encode([cfg.negative_prompt], negative=True)
        if cfg.pacing == "even" and not walker.paces_itself:
            frames = even_pacing(run, walker, frames, keys, uncond)
        cells = [self.cell(cfg, walker, f, keyframes) for f in frames]

        def record(cell: dict) -> dict:
            return {**image_record(run, cell), "type": "frame", "path": f"frames/{cell['index']:06d}.png"}

        def make(chunk: list[dict], previous: Any = None):
            return render(run, walker, [frames[c["index"]] for c in chunk], keys, uncond, int(cfg.steps),
                          hooks=list(run.recorders.values()), samples=chunk, previous=previous)

        if walker.needs_previous_image:  # one frame at a time, each from the previous frame's PNG
            for cell in cells:
                prev = run.run_dir / f"frames/{cell['index'] - 1:06d}.png"
                previous = Image.open(prev).convert("RGB") if cell["index"] else None
                run.generate([cell], lambda chunk: make(chunk, previous), record)
        else:
            run.generate(cells, make, record)

        records = sorted(run.records, key=lambda r: r["index"])
        self.outputs(run, walker, walk, records)

    @staticmethod
    def cell(cfg: Any, walker: Walker, f: Frame, keyframes: list) -> dict:
        ids, weights = walker.prompt_weights(f, len(keyframes))
        main = ids[int(np.argmax(weights))]
        cell = dict(index=f.index, frame=f.index, prompt=keyframes[main].prompt,
                    seed=keyframes[walker.seed_keyframe(f, len(keyframes))].seed,
                    guidance_scale=float(cfg.guidance_scales[0]), time=round(f.time, 6),
                    keyframe=f.segment, position=f.position, keyframes=ids, prompts=[keyframes[i].prompt for i in ids],
                    prompt_weights=weights, seeds=[keyframes[i].seed for i in dict.fromkeys(walker.ends(f, len(keyframes)))],
                    walker={"name": walker.plugin_name, **{k: v for k, v in f.meta.items() if k != "caption"}})
        if "caption" in f.meta:
            cell["caption"] = f.meta["caption"]
        return cell

    def outputs(self, run: Run, walker: Walker, walk: Walk, records: list[dict]) -> None:
        cfg = run.cfg
        video = walk_video(run, walker, walk, records)
        n = len(records)
        caption = f"{cfg.name}: walker={walker.plugin_name}, {n} frames at {walk.fps:g} fps"
        run.add_artifact(video, "video", caption=caption, log_key="walk", frames=n, fps=walk.fps)
        srt = write_srt(run.path("walk.srt"), records, walk.fps)
        if srt:
            run.add_artifact(srt, "file", caption="captions (SubRip)")
        if cfg.gif:
            gif = run.path("walk.gif")
            write_gif(video, gif)
            run.add_artifact(gif, "video", caption=caption, log_key="walk_gif", frames=n)
        mkeys = metric_keys(records)
        cols = ["frame", "time", "keyframe", "position", "prompt", "prompt_weights", "seed", *mkeys]
        run.logger.table("frames", cols, [[r["frame"], r["time"], r["keyframe"], r["position"], r["prompt"],
                                           json.dumps(r["prompt_weights"]), r["seed"], *[r.get(m) for m in mkeys]]
                                          for r in records])
        run.logger.summary({"frames": n, "fps": walk.fps, "seconds": n / walk.fps})
        summarise_metrics(run, key="keyframe", label="segment (from keyframe)", filename="metrics_by_segment")
        log.info("walk: %d frames -> %s", n, video)

