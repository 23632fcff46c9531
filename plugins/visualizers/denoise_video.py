from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stablefused import records as rec_io
from stablefused.video import write_mp4
from stablefused.preview import compose, decode_to_pil, decoder_for, fit_size, hstack, one_frame
from stablefused.registry import PluginError, register

PANELS = {"x_t": ("latents", "x_t", "x_t"), "x_prev": ("latents", "x_prev", "x_{t-1}"), "x0": ("x0", "x0", "pred x0")}
LAYOUTS = ("grid", "square", "sample")


def _short(text: str, n: int = 26) -> str:
    return textwrap.shorten(str(text), n, placeholder="…")


@register("visualizers", "denoise_video")
class DenoiseVideo:
    """MP4 (and optional GIF) of the denoising process: panels x_t | x̂0 per sample, one frame per step.

    ``layout``: ``grid`` (as the run's image grid: rows prompt/seed, columns guidance scale; ``rows`` picks
    grid rows), ``square`` (the chosen ``samples`` in a near-square grid: 4 prompts → 2×2) or ``sample`` (one
    sample: ``sample`` = its global index). ``panels`` side by side per sample: x_t, x0 (x̂0), x_prev. Each
    frame is titled with step, t and σ; after the last step ``hold`` frames show the end (x_t panel = final
    latents). ``decode``: vae, linear (fast preview) or auto. Panels are shown at the image size, upscaled
    (nearest) to ``min_cell`` or downscaled to ``max_cell`` pixels; frames are padded to a multiple of 16.
    Needs recorders ``latents`` (x_t, x_prev panels) and ``x0`` (x0 panel). Videos (task=txt2video): each
    panel shows one frame of the video, ``frame`` (default null: the middle one, as the run's image records).
    """

    ranges = {"rows": (0, None), "samples": (0, None), "sample": (0, None), "fps": (1, 120), "hold": (0, 1000),
              "min_cell": (1, 4096), "max_cell": (1, 4096)}

    run_params = {"samples": "images", "sample": "images", "rows": "rows", "panels": "list"}

    def __init__(self, panels: list[Literal["x_t", "x0", "x_prev"]] | Literal["x_t", "x0", "x_prev"] = ("x_t", "x0"),
                 layout: Literal["grid", "square", "sample"] = "grid", rows: list[int] | None = None,
                 samples: list[int] | None = None, sample: int = 0, decode: Literal["vae", "linear", "auto"] = "vae", fps: int = 8,
                 hold: int = 8, gif: bool = False, min_cell: int = 128, max_cell: int | None = 256,
                 filename: str = "denoise", frame: int | None = None):
        panels = [panels] if isinstance(panels, str) else list(panels)
        bad = [p for p in panels if p not in PANELS]
        if not panels or bad:
            raise PluginError(f"visualizers.denoise_video: panels={panels}: choose from {', '.join(PANELS)}")
        if layout not in LAYOUTS:
            raise PluginError(f"visualizers.denoise_video: layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
        if decode not in ("vae", "linear", "auto"):
            raise PluginError(f"visualizers.denoise_video: decode={decode!r}: must be vae, linear or auto")
        if int(fps) < 1 or int(hold) < 0:
            raise PluginError("visualizers.denoise_video: fps must be >= 1 and hold >= 0")
        self.panels, self.layout, self.decode = panels, layout, decode
        self.rows = None if rows is None else [int(r) for r in rows]
        self.samples = None if samples is None else [int(s) for s in samples]
        self.sample, self.fps, self.hold, self.gif = int(sample), int(fps), int(hold), bool(gif)
        self.min_cell, self.name = int(min_cell), str(filename)
        self.max_cell = None if max_cell is None else int(max_cell)
        self.frame = None if frame is None else int(frame)

    @classmethod
    def requires(cls, params: dict) -> list[str]:
        panels = params.get("panels", ("x_t", "x0"))
        panels = [panels] if isinstance(panels, str) else list(panels)
        return list(dict.fromkeys(PANELS[p][0] for p in panels if p in PANELS))

    # ------------------------------------------------------------------------------------------------
    def _choose(self, metas: list[dict]) -> tuple[list[list[int | None]], list[str], list[str], list[list[str]]]:
        """Positions (into the records' sample axis) as rows of cells, with row/col/cell labels."""
        pos_of = {int(m["index"]): p for p, m in enumerate(metas)}
        layout = self.layout
        if layout == "grid" and not all("row" in m and "col" in m for m in metas):
            layout = "square"
        if layout == "sample":
            if self.sample not in pos_of:
                raise PluginError(f"visualizers.denoise_video: sample={self.sample} was not recorded; recorded "
                                  f"samples: {sorted(pos_of)}")
            m = metas[pos_of[self.sample]]
            return [[pos_of[self.sample]]], [], [], [[_label(m)]]
        if layout == "grid":
            rows = sorted({int(m["row"]) for m in metas})
            rows = [r for r in rows if self.rows is None or r in self.rows]
            cols = sorted({int(m["col"]) for m in metas})
            if not rows:
                raise PluginError(f"visualizers.denoise_video: rows={self.rows}: none of them was recorded")
            at = {(int(m["row"]), int(m["col"])): p for p, m in enumerate(metas)}
            cells = [[at.get((r, c)) for c in cols] for r in rows]
            first_in_row = {r: next(metas[p] for p in row if p is not None) for r, row in zip(rows, cells)}
            first_in_col = {c: next(metas[at[(r, c)]] for r in rows if (r, c) in at) for c in cols}
            row_labels = [f"{_short(first_in_row[r].get('prompt', ''), 22)} s{first_in_row[r].get('seed', '')}"
                          for r in rows]
            col_labels = [f"w={float(first_in_col[c].get('guidance_scale', float('nan'))):g}" for c in cols]
            return cells, row_labels, col_labels, []
        wanted = sorted(pos_of) if self.samples is None else [i for i in self.samples if i in pos_of]
        if not wanted:
            raise PluginError(f"visualizers.denoise_video: samples={self.samples}: none of them was recorded")
        ncols = math.ceil(math.sqrt(len(wanted)))
        flat = [pos_of[i] for i in wanted]
        cells = [flat[k : k + ncols] for k in range(0, len(flat), ncols)]
        return cells, [], [], [[_label(metas[p]) for p in row] for row in cells]

    def __call__(self, run: Any) -> list[Path]:
        need = self.requires({"panels": self.panels})
        rec_io.require(run, "denoise_video", need)
        rec = rec_io.from_run(run)
        keys = [PANELS[p][1] for p in self.panels]
        for k in keys:
            if k not in rec:
                raise PluginError(f"visualizers.denoise_video: nothing recorded for {k} (no samples selected?)")
        metas = rec.samples(keys[0])
        steps = rec.steps(keys[0])
        for k in keys[1:]:
            if rec.steps(k) != steps or [m["index"] for m in rec.samples(k)] != [m["index"] for m in metas]:
                raise PluginError(f"visualizers.denoise_video: panels {', '.join(self.panels)} were recorded at "
                                  "different steps or samples; give their recorders the same every/samples/per")
        cells, row_labels, col_labels, cell_labels = self._choose(metas)
        used = sorted({p for row in cells for p in row if p is not None})
        h, w = _image_size(run, rec)

        def lat(key: str):  # (n, S, C, h, w): a video's chosen frame
            return one_frame(rec[key][used], rec.index["tensors"][key]["dims"], self.frame)

        fit = lat("x0").flatten(0, 1).float() if "x0" in rec else None
        decoder = decoder_for(run, self.decode, fit_latents=fit)
        # decoded[panel][pos] = list over steps of PIL images (plus the end state)
        decoded: dict[str, dict[int, list]] = {}
        for p, key in zip(self.panels, keys):
            t = lat(key)  # (n, S, C, h, w)
            end = t[:, -1:]
            if p == "x_t" and "x_prev" in rec:  # the end frame shows the final latents
                end = lat("x_prev")[:, -1:]
            imgs = decode_to_pil(decoder, torch_cat(t, end), fit_size((w, h), self.max_cell))
            per = t.shape[1] + 1
            decoded[p] = {pos: imgs[k * per : (k + 1) * per] for k, pos in enumerate(used)}

        ts, sigmas, n = rec.t(keys[0]), rec.sigma(keys[0]), rec.index.get("steps") or len(steps)
        start = int(rec.info(keys[0]).get("start_step", 0))  # img2img: the loop began at this schedule step
        panel_names = " | ".join(PANELS[p][2] for p in self.panels)
        frames = []
        for s in range(len(steps) + 1):
            final = s == len(steps)
            if final and self.hold == 0:
                break
            grid_cells = [[None if pos is None else hstack([decoded[p][pos][s] for p in self.panels])
                           for pos in row] for row in cells]
            title = (f"final ({panel_names})" if final else
                     f"step {start + steps[s] + 1}/{n}  t={ts[s]:.0f}  sigma={sigmas[s]:.3g}  ({panel_names})")
            img = compose(grid_cells, cell_labels, row_labels, col_labels, title=title, min_cell=self.min_cell,
                          multiple=16)
            frames.extend([np.asarray(img)] * (self.hold if final else 1))

        out = []
        path = run.path(f"{self.name}.mp4")
        write_mp4(path, frames, self.fps)
        caption = f"denoising ({self.layout}, {panel_names}), {len(steps)} steps"
        run.add_artifact(path, "video", caption=caption, log_key=f"{self.name}_video", frames=len(frames),
                         fps=self.fps, size=[frames[0].shape[1], frames[0].shape[0]])
        out.append(path)
        if self.gif:
            gif = run.path(f"{self.name}.gif")
            import imageio.v3 as iio

            iio.imwrite(gif, np.stack(frames), duration=1000 / self.fps, loop=0)
            run.add_artifact(gif, "video", caption=caption, log_key=f"{self.name}_gif", frames=len(frames))
            out.append(gif)
        return out


def torch_cat(a, b):
    import torch

    return torch.cat([a, b], dim=1)


def _label(m: dict) -> str:
    g = m.get("guidance_scale")
    return _short(m.get("prompt", f"#{m.get('index')}"), 30) + (f" w={float(g):g}" if g is not None else "")


def _image_size(run: Any, rec: rec_io.Records) -> tuple[int, int]:
    h, w = rec.index.get("height"), rec.index.get("width")
    if h and w:
        return int(h), int(w)
    return run.image_size
