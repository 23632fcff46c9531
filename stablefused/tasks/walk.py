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
import math
import subprocess
from numbers import Real
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from stablefused import registry
from stablefused.outputs import font, strict_json
from stablefused.runs import Run, image_record, image_size, metric_keys, summarise_metrics
from stablefused.tasks import Task, register_task
from stablefused.walkers import Frame, Keys, Walk, Walker, default_keyframes, derived_seed

log = logging.getLogger(__name__)
PACINGS = ("uniform", "even")
MAX_WALK_FRAMES = 100_000  # frames of one walk (2.3 hours at 12 fps): beyond this a typo, not a plan
PREVIEW_BUDGET = 8  # pacing=even: at most this many previews per frame of a segment
PREVIEW_SIDE = 64  # ... compared at most this size (area-averaged)
MIN_WIDTH = 1e-7  # ... and no finer than this fraction of a segment (float32 noise: ~1e-7 relative)
VIDEO_MIN_SIDE = 256  # small models' frames are upscaled (nearest) to at least this in the video


# --------------------------------------------------------------------------------------------- config
def resolve_file(path: str | None) -> Path | None:
    """A user's file: as given (relative to the working directory), else relative to the shipped conf/."""
    if path is None:
        return None
    from stablefused.paths import config_dir

    p = Path(str(path)).expanduser()
    if not p.is_absolute() and not p.exists() and (config_dir() / p).exists():
        return config_dir() / p
    return p


def make_walker(cfg: Any) -> Walker:
    node = cfg.get("walker")
    params = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    name = params.pop("name", None)
    try:
        return registry.create("walkers", name, **params)
    except registry.ParamError as e:  # each bad parameter named as the user writes it: walker.<param>=...
        raise registry.PluginError("\n".join(f"walker.{p}" for p in e.problems)) from None
    except registry.PluginError as e:
        raise registry.PluginError(f"walker={name}: {e}") from None


def walk_settings(cfg: Any) -> Walk:
    prompts = list(cfg.prompts or cfg.model.example_prompts)
    seeds = [int(s) for s in cfg.seeds]
    story, audio = resolve_file(cfg.story), resolve_file(cfg.audio)
    return Walk(keyframes=default_keyframes(prompts, seeds) if cfg.walker.name != "story" else [], seeds=seeds,
                frames=int(cfg.frames), loop=bool(cfg.loop), fps=float(cfg.fps), story=story and str(story),
                audio=audio and str(audio), audio_start=float(cfg.audio_start),
                audio_duration=None if cfg.audio_duration is None else float(cfg.audio_duration))


def _number(cfg: Any, key: str, minimum: float, strict: bool, allow_none: bool = False) -> str | None:
    v = cfg.get(key)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, Real) or (v <= minimum if strict else v < minimum):
        return f"{key}={v!r}: must be a number {'>' if strict else '>='} {minimum:g}"
    return None


# --------------------------------------------------------------------------------------------- tensors
def make_keys(run: Run, keyframes: list, h: int, w: int) -> Keys:
    """Each keyframe's noise (as text-to-image draws it, one generator per seed) and prompt embedding (one
    prompt at a time, so no frame depends on how many keyframes there are)."""
    sampler, steps = run.sampler, int(run.cfg.steps)
    noise = torch.cat([sampler.initial_latents([k.seed], h, w, steps=steps)[0] for k in keyframes])
    embeds: dict[str, torch.Tensor] = {}
    for k in keyframes:
        if k.prompt not in embeds:
            embeds[k.prompt] = sampler.encode([k.prompt])[0]
    sigma = float(sampler.scheduler.init_noise_sigma)

    def extra_noise(seed: int, stream: int, n: int) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        gen = torch.Generator("cpu").manual_seed(derived_seed(seed, stream))
        return randn_tensor((n, *noise.shape[1:]), generator=gen, device=noise.device, dtype=noise.dtype) * sigma

    return Keys(noise=noise, cond=torch.stack([embeds[k.prompt] for k in keyframes]),
                seeds=[k.seed for k in keyframes], extra_noise=extra_noise)


def frame_generator(run: Run, seed: int, h: int, w: int) -> torch.Generator:
    """The scheduler's generator for a frame: its keyframe seed's, after drawing the initial noise (as in
    text-to-image), made afresh per frame."""
    return run.sampler.initial_latents([seed], h, w, steps=int(run.cfg.steps))[1][0]


def render(run: Run, walker: Walker, frames: list[Frame], keys: Keys, uncond: torch.Tensor, steps: int,
           hooks: list | None = None, samples: list[dict] | None = None, previous: Any = None):
    """One chunk of frames through the one loop (``Sampler.sample``)."""
    cfg = run.cfg
    h, w = image_size(cfg)
    device, dtype = run.components.device, run.components.dtype
    latents = walker.noise(frames, keys).to(device, dtype)
    cond = walker.text(frames, keys).to(device, dtype)
    k = len(keys.noise)
    gens = [frame_generator(run, keys.seeds[walker.seed_keyframe(f, k)], h, w) for f in frames]
    kwargs: dict[str, Any] = dict(steps=steps, generators=gens, guidance=run.guidance, hooks=list(hooks or []),
                                  samples=samples, eta=cfg.eta, progress=cfg.progress)
    if walker.needs_previous_image:
        extra = dict(walker.condition(frames, previous, keys, run))
        if "images" in extra:  # frames the walker made itself (zoom: crops between its outpainted keyframes)
            return made_frames(run, extra, latents, cond, uncond, samples)
        latents = extra.pop("latents", latents)
        kwargs["hooks"] += list(extra.pop("hooks", []))
        kwargs.update(extra)
    scales = [float(cfg.guidance_scales[0])] * len(frames)
    # this chunk's steps and per-frame scheduler noise seeds (DPM-SDE's Brownian trees), as txt2img sets them
    run.sampler.prepare(steps, [keys.seeds[walker.seed_keyframe(f, k)] for f in frames])
    return run.sampler.sample(latents, cond, uncond.expand(len(frames), -1, -1), scales, **kwargs)


def made_frames(run: Run, extra: dict, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                samples: list[dict] | None):
    """A :class:`Generation` of frames a walker made without the loop (``condition`` returned ``images``,
    float (B, H, W, 3) in [0, 1]); ``stats`` = the UNet work it did for them (counted in the run's)."""
    from stablefused.hooks import LoopContext
    from stablefused.pipeline import Generation

    stats = {"unet_rows": 0, "model_calls": 0, **extra.get("stats", {})}
    ctx = LoopContext(latents=latents, cond_embeds=cond, uncond_embeds=uncond, base_scales=torch.zeros(len(latents)),
                      timesteps=torch.zeros(0), scheduler=run.sampler.scheduler, unet=run.components.unet,
                      samples=samples or [], stats=stats)
    return Generation(np.asarray(extra["images"], np.float32), latents, ctx)


# --------------------------------------------------------------------------------------------- pacing
def frame_distances(images: np.ndarray) -> np.ndarray:
    """RMS pixel change between consecutive images (float, [0, 1])."""
    d = np.diff(images.astype(np.float64), axis=0)
    return np.sqrt((d ** 2).reshape(len(d), -1).mean(axis=1))


def thumbnails(images: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Images (B, H, W, 3) area-averaged to at most ``side`` pixels: previews of a long segment stay small."""
    f = max(1, -(-max(images.shape[1:3]) // side))
    if f == 1:
        return images
    b, h, w, c = images.shape
    h, w = h - h % f, w - w % f
    return images[:, :h, :w].reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def even_pacing(run: Run, walker: Walker, frames: list[Frame], keys: Keys, uncond: torch.Tensor) -> list[Frame]:
    """Move each segment's positions so that consecutive frames are equally different.

    Per segment of n frames: previews (made like the frames, through the one loop) on a grid of 2n + 1
    positions; then, while the preview budget lasts, the intervals that change more than half a frame's share
    are split (a steep change, such as the picture flipping from one shape to another, is found to
    ~1e-6 of the segment); the frames go where the cumulative change reaches k / n of the total. An interval
    still changing more than one frame's share when the budget or the float precision ends is a jump: it is
    given one frame step, and the other frames share the rest evenly."""
    path = run.run_dir / "pacing.json"
    if path.is_file():  # a resumed walk: the positions its first frames were made with
        saved = json.loads(path.read_text())
        if saved.get("frames") == len(frames):
            for f, p in zip(frames, saved["positions"]):
                f.position = float(p)
            return frames
    steps, batch = int(run.cfg.steps), int(run.cfg.batch_size)
    report, rows = {}, 0

    def preview(segment: int, positions: list[float]) -> np.ndarray:
        nonlocal rows
        out = []
        for i in range(0, len(positions), batch):
            gen = render(run, walker, [Frame(-1, segment, float(u)) for u in positions[i : i + batch]], keys, uncond,
                         steps)
            rows += gen.context.stats["unet_rows"]
            out.append(thumbnails(gen.images))
        return np.concatenate(out)

    for s in sorted({f.segment for f in frames}):
        own = [f for f in frames if f.segment == s and 0 < f.position < 1]
        if not own:
            continue
        n = len([f for f in frames if f.segment == s and f.position < 1])
        grid = list(np.linspace(0.0, 1.0, 2 * n + 1))
        images = list(preview(s, grid))
        budget = PREVIEW_BUDGET * n
        while len(grid) < budget:
            d = frame_distances(np.stack(images))
            share = d.sum() / n
            widths = np.diff(grid)
            todo = [i for i in np.argsort(-d) if d[i] > share / 2 and widths[i] > MIN_WIDTH][: max(1, batch // 3)]
            if not todo:
                break
            parts = max(4, batch // len(todo) + 1)  # one batch per round: few intervals are split finer
            new = sorted(grid[i] + widths[i] * j / parts for i in todo for j in range(1, parts))
            for u, img in zip(new, preview(s, new)):
                k = int(np.searchsorted(grid, u))
                grid.insert(k, u)
                images.insert(k, img)
        d = frame_distances(np.stack(images))
        share = d.sum() / n
        jumps = d > share
        if jumps.any() and (~jumps).any():  # a jump takes one frame step; the rest share what is left
            share = d[~jumps].sum() / max(n - int(jumps.sum()), 1)
        cost = np.minimum(d, share)
        cum = np.concatenate([[0.0], np.cumsum(cost)])
        if cum[-1] <= 0:
            continue
        for f in own:
            f.position = float(np.interp(f.position * cum[-1], cum, grid))
        report[str(s)] = {"previews": len(grid), "change": round(float(d.sum()), 6), "jumps": int(jumps.sum())}
    run.stats["unet_rows"] += rows
    path.write_text(strict_json({"frames": len(frames), "preview_steps": steps, "preview_unet_rows": rows,
                                 "segments": report, "positions": [f.position for f in frames]}))
    run.manifest.append({"type": "file", "path": "pacing.json", "caption": "pacing=even: positions per frame"})
    log.info("pacing=even: %d previews (%d UNet rows)", sum(v["previews"] for v in report.values()), rows)
    return frames


# --------------------------------------------------------------------------------------------- video
def _video_size(h: int, w: int) -> tuple[int, int, int]:
    scale = max(1, math.ceil(VIDEO_MIN_SIDE / min(h, w)))
    return scale, -(-h * scale // 16) * 16, -(-w * scale // 16) * 16


def video_frame(png: Path, scale: int, height: int, width: int, caption: str | None, caption_size: float) -> np.ndarray:
    img = Image.open(png).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
    out = Image.new("RGB", (width, height), "black")
    out.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    if caption:
        from stablefused.runs import wrap

        size = max(10, int(caption_size * height))
        text = wrap(caption, max(8, int(width / (0.55 * size))))
        d = ImageDraw.Draw(out)
        d.multiline_text((width // 2, height - size // 2), text, font=font(size), fill="white", anchor="md",
                         align="center", stroke_width=max(1, size // 10), stroke_fill="black")
    return np.asarray(out)


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"ffmpeg failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")


def write_video(run: Run, walker: Walker, walk: Walk, records: list[dict]) -> Path:
    """walk.mp4 from the frame PNGs, streamed one frame at a time (H.264, yuv420p); captions burned in; the
    walker's soundtrack muxed in."""
    import imageio.v2 as iio2

    h, w = image_size(run.cfg)
    scale, height, width = _video_size(h, w)
    caption_size = float(getattr(walker, "caption_size", 0.06))
    sound = walker.soundtrack(walk)
    path = run.path("walk.mp4")
    silent = path.with_name("walk.video.mp4") if sound else path
    with iio2.get_writer(str(silent), format="FFMPEG", mode="I", fps=walk.fps, codec="libx264", quality=8,
                         pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error") as writer:
        for rec in records:
            writer.append_data(video_frame(run.run_dir / rec["path"], scale, height, width, rec.get("caption"),
                                           caption_size))
    if sound:
        audio, start, duration = sound
        ffmpeg("-i", str(silent), "-ss", f"{start:.6f}", "-t", f"{duration:.6f}", "-i", audio, "-map", "0:v:0",
               "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-shortest", str(path))
        silent.unlink()
    return path


def write_srt(path: Path, records: list[dict], fps: float) -> Path | None:
    """Subtitles: one cue per run of frames with the same caption."""
    cues, start = [], 0
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].get("caption") != records[start].get("caption"):
            if records[start].get("caption"):
                cues.append((records[start]["frame"] / fps, (records[i - 1]["frame"] + 1) / fps,
                             records[start]["caption"]))
            start = i
    if not cues:
        return None

    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    path.write_text("".join(f"{n}\n{ts(a)} --> {ts(b)}\n{text}\n\n" for n, (a, b, text) in enumerate(cues, 1)))
    return path


# --------------------------------------------------------------------------------------------- task
@register_task("walk")
class WalkTask(Task):
    """Latent walk: keyframes (prompt, seed) → frames along a walker's path → frames/*.png and walk.mp4."""

    types = {"fps": Real, "story": Optional[str], "audio": Optional[str], "audio_start": Real,
             "audio_duration": Optional[Real]}

    output_type = "frame"

    def validate(self, cfg: Any, problems: list[str]) -> None:
        before = len(problems)
        if isinstance(cfg.frames, bool) or not isinstance(cfg.frames, int) or cfg.frames < 1:
            problems.append(f"frames={cfg.frames!r}: must be an integer >= 1 (frames from one keyframe to the next)")
        for key in ("loop", "gif"):
            if not isinstance(cfg.get(key), bool):
                problems.append(f"{key}={cfg.get(key)!r}: must be true or false")
        for msg in (_number(cfg, "fps", 0, strict=True), _number(cfg, "audio_start", 0, strict=False),
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
        if not walker.paces_itself and keyframes:
            total = sum(walker.segment_frames(walk, keyframes)) + 1
            if total > MAX_WALK_FRAMES:
                src = f"story={cfg.story} at fps={cfg.fps:g}" if name == "story" else f"frames={cfg.frames}"
                problems.append(f"{src}: {total:,} frames in all, more than {MAX_WALK_FRAMES:,} (hours of video, "
                                "days of sampling); use fewer or shorter scenes, fewer frames or a lower fps")

    def run(self, run: Run) -> None:
        cfg = run.cfg
        run.keep_images = False  # frames are written as made; memory does not grow with the walk's length
        walker, walk = make_walker(cfg), walk_settings(cfg)
        keyframes = walker.keyframes(walk)
        frames = walker.plan(walk, keyframes)
        assert [f.index for f in frames] == list(range(len(frames))), "a walker's plan must number frames 0..n-1"
        h, w = image_size(cfg)
        keys = make_keys(run, keyframes, h, w)
        uncond = run.sampler.encode([cfg.negative_prompt])
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
        video = write_video(run, walker, walk, records)
        n = len(records)
        caption = f"{cfg.name}: walker={walker.plugin_name}, {n} frames at {walk.fps:g} fps"
        run.add_artifact(video, "video", caption=caption, log_key="walk", frames=n, fps=walk.fps)
        srt = write_srt(run.path("walk.srt"), records, walk.fps)
        if srt:
            run.add_artifact(srt, "file", caption="captions (SubRip)")
        if cfg.gif:
            gif = run.path("walk.gif")
            ffmpeg("-i", str(video), "-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", "0", str(gif))
            run.add_artifact(gif, "video", caption=caption, log_key="walk_gif", frames=n)
        mkeys = metric_keys(records)
        cols = ["frame", "time", "keyframe", "position", "prompt", "prompt_weights", "seed", *mkeys]
        run.logger.table("frames", cols, [[r["frame"], r["time"], r["keyframe"], r["position"], r["prompt"],
                                           json.dumps(r["prompt_weights"]), r["seed"], *[r.get(m) for m in mkeys]]
                                          for r in records])
        run.logger.summary({"frames": n, "fps": walk.fps, "seconds": n / walk.fps})
        summarise_metrics(run, key="keyframe", label="segment (from keyframe)", filename="metrics_by_segment")
        log.info("walk: %d frames -> %s", n, video)

