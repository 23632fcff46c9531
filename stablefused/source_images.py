"""What the source-image tasks share (``task=img2img`` and its subclass ``task=inpaint``): the strengths
check, the output size, the inputs listed in the manifest, the grid rows, the cells per strength, the
records and the grid with the source column."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable

from omegaconf import OmegaConf
from PIL import Image

from stablefused import images as im
from stablefused.runs import Run, image_record, prompt_seed_rows, row_label, wrap
from stablefused.tasks import Task


def strength_problems(cfg: Any) -> list[str]:
    v = cfg.get("strengths")
    if isinstance(v, Real) and not isinstance(v, bool):
        return [f"strengths={v}: must be a list, e.g. strengths=[{v}]"]
    if isinstance(v, (str, bool)) or OmegaConf.is_dict(v) or isinstance(v, dict):
        return [f"strengths={v!r}: must be a list of numbers in (0, 1], e.g. strengths=[0.3,0.6,0.9]"]
    try:
        items = list(v)
    except TypeError:
        return [f"strengths={v!r}: must be a list of numbers in (0, 1], e.g. strengths=[0.3,0.6,0.9]"]
    if not items:
        return ["strengths=[]: give at least one strength in (0, 1], e.g. strengths=[0.6]"]
    out = []
    steps = cfg.get("steps")
    for s in items:
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or not 0 < s <= 1:
            out.append(f"strengths: {s!r} is not in (0, 1]; 0 would return the source unchanged, 1 noises it fully "
                       "(use e.g. strengths=[0.3,0.6,0.9])")
        elif isinstance(steps, int) and int(s * steps) < 1:
            out.append(f"strengths: {s:g} x steps={steps} runs no denoising step (int(strength*steps) = 0); "
                       f"use strength >= {1 / steps:g} or more steps")
    return out


def selected_recorders(cfg: Any) -> list[str]:
    from stablefused import registry

    return list(registry.selected(cfg, "recorders"))


class SourceImageTask(Task):
    """Base of the tasks whose inputs are source images (one grid row per source x prompt/seed)."""

    @staticmethod
    def max_pixels_problems(cfg: Any, found: list, height: int, width: int) -> list[str]:
        """``max_pixels`` against the size the run really makes (from the first source when height/width are
        unset) times the images of one batch."""
        limit, batch = cfg.get("max_pixels"), cfg.get("batch_size")
        if not (isinstance(limit, int) and isinstance(batch, int) and batch >= 1) or isinstance(limit, bool):
            return []
        try:
            prompts = len(list(cfg.prompts or cfg.model.example_prompts or [None]))
            cells = len(found) * prompts * len(list(cfg.seeds)) * len(list(cfg.strengths)) * len(list(cfg.guidance_scales))
        except TypeError:
            cells = batch
        per_batch = max(1, min(batch, cells))
        total = height * width * per_batch
        if total <= limit:
            return []
        return [f"max_pixels={limit:,}: {per_batch} output(s) per batch of {width}x{height} (the size "
                f"{'init_image=' + found[0][0] + ' gives' if cfg.get('height') is None or cfg.get('width') is None else 'set'}) "
                f"are {total:,} pixels; set a smaller height/width or batch_size, or raise max_pixels"]

    @staticmethod
    def output_size(cfg: Any, name: str, size: tuple[int, int], max_size: float) -> tuple[int, int]:
        """(height, width) of every output: ``height``/``width`` where given, else the first image's size after
        the resize policy (as diffusers sizes a list of images by its first)."""
        mult = int(cfg.model.get("size_multiple") or 8)
        out = im.target_size(size, cfg.resize, mult, cfg.get("height"), cfg.get("width"))
        im.check_size(name, size, out, cfg.model, float(max_size),
                      given=(cfg.get("height") is not None, cfg.get("width") is not None))
        return out

    # ---- shared with task=inpaint (a subclass): inputs, cells and the grid of a source-image task
    @staticmethod
    def save_input(run: Run, i: int, source: Any, image: Image.Image, height: int, width: int) -> None:
        """Source ``i`` as the model sees it (fitted), listed in the manifest before any output."""
        path = run.path("inputs", f"source_{i:02d}.png")
        image.save(path)
        run.add_artifact(path, "input", caption=source.description or source.spec, log_key=f"source_{i:02d}",
                         init_image=source.spec, source=source.description, original_size=list(source.image.size),
                         converted=source.converted, resize=run.cfg.resize, height=height, width=width)

    @staticmethod
    def rows(run: Run, sources: list) -> list[tuple[int, str, int]]:
        """Grid rows: (source index, prompt, seed) for every source x prompt/seed row."""
        return [(i, p, s) for i in range(len(sources)) for p, s in prompt_seed_rows(run.cfg)]

    @staticmethod
    def strength_cells(run: Run, rows: list, sources: list, height: int, width: int,
                       **extra: Callable[[int], Any]) -> list[tuple[float, list[dict]]]:
        """The cells of each strength (one strength per batch: it sets where the loop starts). Column 0 is the
        source; ``extra``: record keys computed from the source index."""
        cfg = run.cfg
        strengths, scales = [float(s) for s in cfg.strengths], [float(g) for g in cfg.guidance_scales]
        per_row = len(strengths) * len(scales)
        run.total = len(rows) * per_row
        out = []
        for si, strength in enumerate(strengths):
            cells = []
            for r, (i, p, seed) in enumerate(rows):
                for gi, g in enumerate(scales):
                    col = si * len(scales) + gi
                    cells.append(dict(index=r * per_row + col, row=r, col=1 + col, prompt=p, seed=seed,
                                      guidance_scale=g, strength=strength, init_image=sources[i].spec,
                                      source=sources[i].description, resize=cfg.resize, height=height,
                                      width=width, **{k: f(i) for k, f in extra.items()}, source_index=i))
            out.append((strength, cells))
        return out

    @staticmethod
    def record(run: Run, cell: dict) -> dict:
        return image_record(run, {k: v for k, v in cell.items() if k != "source_index"})

    @staticmethod
    def save_grid(run: Run, rows: list, sources: list, first: list[Image.Image], first_label: str,
                  caption: str) -> None:
        """Rows = source x prompt/seed; column 0 = ``first[source]``, then strength x guidance."""
        cfg = run.cfg
        strengths, scales = [float(s) for s in cfg.strengths], [float(g) for g in cfg.guidance_scales]
        ncols = 1 + len(strengths) * len(scales)
        cells: list[Image.Image | None] = [None] * (len(rows) * ncols)
        for r, (i, _, _) in enumerate(rows):
            cells[r * ncols] = first[i]
        for img, rec in zip(run.images, run.records):
            cells[rec["row"] * ncols + rec["col"]] = img
        col_labels = [first_label] + [f"strength {s:g}" + (f"\nw={g:g}" if len(scales) > 1 else "")
                                      for s in strengths for g in scales]
        row_labels = [wrap(f"{sources[i].description or sources[i].spec.split('/')[-1]}\n-> {p}\nseed {s}")
                      if len(sources) > 1 or sources[i].description else row_label(p, s) for i, p, s in rows]
        run.save_grid(cells, len(rows), ncols, row_labels, col_labels, caption=caption)
