from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from stablefused import records as rec_io
from stablefused.preview import compose, decode_to_pil, decoder_for, fit_size, one_frame
from stablefused.registry import PluginError, register

SOURCES = {"x0": "x0", "x_t": "latents", "x_prev": "latents"}


@register("visualizers", "step_strip")
class StepStrip:
    """One image of x̂0 (or x_t) at chosen steps: a row per sample, a column per step (labelled step and t).

    ``source``: x0, x_t or x_prev. ``steps``: explicit step indices (0-based, as recorded), else ``count``
    steps evenly spread over the recorded ones (first and last included). ``final`` adds the final image as
    the last column. ``samples``: global sample indices (null = every recorded sample). ``decode``: vae,
    linear or auto. Cells: image size, at least ``min_cell``, at most ``max_cell`` pixels. Needs recorder
    ``x0`` (source x0) or ``latents`` (x_t, x_prev). Videos (task=txt2video): each cell shows one frame,
    ``frame`` (default null: the middle one, the frame of the run's image records, so of the final column).
    """

    ranges = {"steps": (0, None), "count": (1, None), "samples": (0, None), "min_cell": (1, 4096), "max_cell": (1, 4096)}

    run_params = {"samples": "images", "steps": "steps"}

    def __init__(self, source: Literal["x0", "x_t", "x_prev"] = "x0", steps: list[int] | None = None, count: int = 8,
                 samples: list[int] | None = None, final: bool = True, decode: Literal["vae", "linear", "auto"] = "vae",
                 min_cell: int = 96, max_cell: int | None = 192, filename: str | None = None,
                 frame: int | None = None):
        if source not in SOURCES:
            raise PluginError(f"visualizers.step_strip: source={source!r}: must be one of {', '.join(SOURCES)}")
        if int(count) < 1:
            raise PluginError("visualizers.step_strip: count must be >= 1")
        self.source, self.count, self.final, self.decode = source, int(count), bool(final), decode
        self.steps = None if steps is None else [int(s) for s in steps]
        self.samples = None if samples is None else [int(s) for s in samples]
        self.min_cell, self.name = int(min_cell), filename or f"step_strip_{source}"
        self.max_cell = None if max_cell is None else int(max_cell)
        self.frame = None if frame is None else int(frame)

    @classmethod
    def requires(cls, params: dict) -> list[str]:
        return [SOURCES.get(params.get("source", "x0"), "x0")]

    def pick(self, recorded: list[int]) -> list[int]:
        """Positions (into the recorded steps) to show."""
        if self.steps is not None:
            missing = [s for s in self.steps if s not in recorded]
            if missing:
                raise PluginError(f"visualizers.step_strip: steps {missing} were not recorded; recorded: {recorded}")
            return [recorded.index(s) for s in self.steps]
        n = len(recorded)
        k = min(self.count, n)
        return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})

    def __call__(self, run: Any) -> list[Path]:
        rec_io.require(run, "step_strip", self.requires({"source": self.source}))
        rec = rec_io.from_run(run)
        if self.source not in rec:
            raise PluginError(f"visualizers.step_strip: nothing recorded for {self.source}")
        metas = rec.samples(self.source)
        pos = [p for p, m in enumerate(metas) if self.samples is None or int(m["index"]) in self.samples]
        if not pos:
            raise PluginError(f"visualizers.step_strip: samples={self.samples}: none of them was recorded")
        recorded, ts = rec.steps(self.source), rec.t(self.source)
        cols = self.pick(recorded)
        h, w = int(rec.index.get("height") or 0), int(rec.index.get("width") or 0)
        if not (h and w):
            h, w = run.image_size
        dims = rec.index["tensors"][self.source]["dims"]
        lat = one_frame(rec[self.source][pos][:, cols], dims, self.frame)  # (n, k, C, h, w)
        fit = (one_frame(rec["x0"][pos], rec.index["tensors"]["x0"]["dims"], self.frame).flatten(0, 1).float()
               if "x0" in rec else None)
        size = fit_size((w, h), self.max_cell)
        imgs = decode_to_pil(decoder_for(run, self.decode, fit_latents=fit), lat, size)
        k = len(cols)
        finals = {int(r["index"]): img for r, img in zip(run.records, run.images)}
        cells, row_labels = [], []
        for n, p in enumerate(pos):
            row = imgs[n * k : (n + 1) * k]
            idx = int(metas[p]["index"])
            if self.final:
                final = finals.get(idx)
                row = row + [final.resize(size, Image.BILINEAR) if final is not None and final.size != size
                             else final]
            cells.append(row)
            m = metas[p]
            g = m.get("guidance_scale")
            row_labels.append(textwrap.shorten(str(m.get("prompt", f"#{idx}")), 24, placeholder="…")
                              + (f" w={float(g):g}" if g is not None else ""))
        n_steps = rec.index.get("steps") or len(recorded)
        col_labels = [f"{recorded[c] + 1}/{n_steps} t={ts[c]:.0f}" for c in cols] + (["final"] if self.final else [])
        label = {"x0": "predicted x0", "x_t": "x_t", "x_prev": "x_{t-1}"}[self.source]
        img = compose(cells, None, row_labels, col_labels, title=f"{label} during denoising (step/total, t)",
                      min_cell=self.min_cell)
        path = run.path(f"{self.name}.png")
        img.save(path)
        run.add_artifact(path, "image", caption=f"{label} at steps {[recorded[c] for c in cols]}",
                         log_key=self.name)
        return [path]
