"""``task=txt2video``: text to video with a video UNet (``UNet3DConditionModel``: ModelScope, Zeroscope).

Every (prompt, seed) row under every guidance scale, as ``txt2img``, but each cell is a video of ``frames``
frames: 5-D latents (B, C, F, H, W) through the one loop (:meth:`Sampler.sample`), noise drawn as
``TextToVideoSDPipeline.prepare_latents`` draws it (one generator per video), frames decoded in batches of
:data:`~stablefused.pipeline.FRAMES_PER_DECODE`. Unlike the pipeline, guidance ≤ 1 is honoured (0: the
negative prompt only, 1: the prompt only; the loop skips the unneeded half batch).

Per video (``videos/<index>_r<row>_c<col>_s<seed>...``), each written as soon as it exists:

* ``.../frame_<k>.png``: every frame, lossless, manifest ``type: frame`` (prompt, seed, guidance, ``frame``);
* ``....mp4``: H.264 (libx264, yuv420p) at ``fps``, manifest ``type: video``, logged to W&B as a video;
* ``..._strip.png``: the frames side by side, manifest ``type: strip``;
* the video's image record (``type: image``, ``images/...png``): its middle frame (``frame`` = F // 2), which
  metrics score, ``grid.png`` shows and a resumed run checks (written last: a video with it is complete).

Recorders see 5-D latents (tensors (N, S, C, F, h, w)); ``denoise_video`` and ``step_strip`` show one frame of
each (their ``frame`` parameter, default the middle one).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from stablefused.errors import ConfigError
from stablefused.outputs import save_png, to_uint8
from stablefused.video import write_mp4
from stablefused.pipeline import Generation, Sampler
from stablefused.sampling import Request
from stablefused.runs import (
    Run, image_record, image_size, log_samples_table, prompt_seed_rows, row_label, summarise_metrics,
)
from stablefused.tasks import Task, register_task
from stablefused.tasks.txt2img import guidance_cells

VIDEO_UNET = "UNet3DConditionModel"


@torch.no_grad()
def txt2video(sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int], guidance_scales: Sequence[float],
              negative_prompts: Sequence[str] | str = "", *, frames: int = 16, steps: int = 20,
              height: int, width: int, eta: float = 0.0, samples: list[dict] | None = None,
              **loop_kw: Any) -> Generation:
    """Videos through the one loop: ``Generation.images`` are frames (B, F, H, W, 3) float32 in [0, 1]."""
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    cond, uncond, negative = sampler.conditions(prompts, negative_prompts, loop_kw.get("guidance"))
    # as TextToVideoSDPipeline.prepare_latents: (B, C, F, H/f, W/f), one CPU generator per video
    latents, generators = sampler.initial_latents(seeds, height, width, frames=frames, steps=steps)
    return sampler.sample(Request(latents, cond, uncond, list(guidance_scales), steps, generators=generators,
                                  samples=samples, eta=eta, negative=negative), **loop_kw)


def frame_path(cell: dict, frame: int | None = None) -> str:
    stem = f"videos/{cell['index']:04d}_r{cell.get('row', 0)}_c{cell.get('col', 0)}_s{cell['seed']}"
    return stem if frame is None else f"{stem}/frame_{frame:03d}.png"


def save_video(run: Run, cell: dict, frames: np.ndarray) -> None:
    """One video's frame PNGs (+ manifest lines), MP4 and frame strip; ``frames`` (F, H, W, 3) in [0, 1]."""
    cfg = run.cfg
    frames8 = to_uint8(frames)
    for k, img in enumerate(frames8):
        rec = {**image_record(run, cell), "type": "frame", "path": frame_path(cell, k), "frame": k}
        save_png(img, run.run_dir / rec["path"], rec)
        run.manifest.append(rec)
    about = dict(index=cell["index"], prompt=cell["prompt"], seed=cell["seed"], guidance_scale=cell["guidance_scale"],
                 frames=len(frames8), fps=int(cfg.video_fps))
    caption = f"{cell['prompt']} | seed {cell['seed']} | guidance {cell['guidance_scale']:g}"
    mp4 = write_mp4(run.path(frame_path(cell) + ".mp4"), list(frames8), int(cfg.video_fps), macro_block_size=2)
    run.add_artifact(mp4, "video", caption=caption, log_key=f"video_{cell['index']:04d}", **about)
    strip = run.path(frame_path(cell) + "_strip.png")
    save_png(np.concatenate(list(frames8), axis=1), strip, image_record(run, cell))
    run.add_artifact(strip, "strip", caption=f"{caption} | frames 0..{len(frames8) - 1}",
                     log_key=f"strip_{cell['index']:04d}", **about)


@register_task("txt2video")
class Txt2Video(Task):
    """Text to video (video UNet models): rows = prompt/seed, columns = guidance scale; frames, MP4, strip."""

    def frames_per_output(self, cfg: Any) -> int:
        return cfg.video_frames if isinstance(cfg.get("video_frames"), int) and not isinstance(cfg.get("video_frames"), bool) else 1

    def validate(self, cfg: Any, problems: list[str]) -> None:
        for key in ("video_frames", "video_fps"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{key}={v!r}: must be an integer >= 1")

    def run(self, run: Run) -> None:
        cfg = run.cfg
        if run.components.family_name != "video":
            net = type(run.components.network).__name__
            raise ConfigError(f"task=txt2video: model {cfg.model.name} has a {net}, not a video UNet "
                              f"({VIDEO_UNET}); use model=zeroscope, model=modelscope or model.path=<a "
                              "TextToVideoSDPipeline folder>")
        height, width = image_size(cfg)
        rows, scales = prompt_seed_rows(cfg), [float(g) for g in cfg.guidance_scales]
        middle = int(cfg.video_frames) // 2

        def make(chunk: list[dict]) -> Generation:
            gen = txt2video(
                run.sampler, [x["prompt"] for x in chunk], [x["seed"] for x in chunk],
                [x["guidance_scale"] for x in chunk], cfg.negative_prompt, frames=int(cfg.video_frames), steps=cfg.steps,
                height=height, width=width, guidance=run.guidance, hooks=list(run.recorders.values()),
                samples=chunk, eta=cfg.eta, progress=cfg.progress,
            )
            for cell, frames in zip(chunk, gen.images):
                save_video(run, cell, frames)
            return Generation(gen.images[:, middle], gen.latents, gen.context)  # the image records: middle frames

        def record(cell: dict) -> dict:
            return {**image_record(run, cell), "frame": middle, "video": frame_path(cell) + ".mp4"}

        run.generate(guidance_cells(run), make, record)
        run.save_grid(run.images, len(rows), len(scales), [row_label(p, s) for p, s in rows],
                      [f"guidance {g:g}" for g in scales],
                      caption=f"{cfg.name}: middle frame of each video; rows prompt/seed, columns guidance")
        log_samples_table(run)
        summarise_metrics(run)
