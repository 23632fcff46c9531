"""``pacing=even``: a walk's frame positions moved so that consecutive frames differ equally, measured on
low-step previews through the one loop (``pacing.json`` keeps the result for a resumed walk)."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from stablefused.outputs import strict_json
from stablefused.runs import Run
from stablefused.walk_render import render
from stablefused.walkers import Frame, Keys, Walker

log = logging.getLogger(__name__)
PREVIEW_BUDGET = 8  # pacing=even: at most this many previews per frame of a segment
PREVIEW_SIDE = 64  # ... compared at most this size (area-averaged)
MIN_WIDTH = 1e-7  # ... and no finer than this fraction of a segment (float32 noise: ~1e-7 relative)


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
