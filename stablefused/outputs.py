"""What a run writes: PNGs with A1111-style parameters, labelled grids, ``manifest.jsonl``.

Everything is written as soon as it exists (one image file + one manifest line per image), so a later
failure never loses what was already produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] → uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def a1111_parameters(rec: dict) -> str:
    """The ``parameters`` text chunk that A1111, ComfyUI and most prompt readers show. ``Sampler`` is the
    record's ``sampler`` (e.g. "Euler a"), else derived from its scheduler (:mod:`stablefused.scheduler_names`)."""
    from stablefused.scheduler_names import record_label

    lines = [rec["prompt"]]
    if rec.get("negative_prompt"):
        lines.append(f"Negative prompt: {rec['negative_prompt']}")
    fields = [
        ("Steps", rec.get("steps")), ("Sampler", record_label(rec)), ("CFG scale", rec.get("guidance_scale")),
        ("Seed", rec.get("seed")), ("Size", f"{rec.get('width')}x{rec.get('height')}"), ("Model", rec.get("model")),
        ("Guidance schedule", rec.get("guidance_schedule")), ("Guidance rule", rec.get("guidance_rule")),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image: np.ndarray | Image.Image, path: Path, rec: dict | None = None) -> Path:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    info = None
    if rec is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", a1111_parameters(rec))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=info)
    return path


def read_parameters(path: str | Path) -> str | None:
    return Image.open(path).text.get("parameters")


class Manifest:
    """``manifest.jsonl``: one JSON record per line, appended and flushed as results arrive."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by None, so that the JSON written is strict."""
    if isinstance(x, (float, np.floating)) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def strict_json(obj: Any) -> str:
    """Indented strict JSON (NaN and infinities become null)."""
    return json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def grid(
    cells: Sequence[Image.Image | None],
    rows: int,
    cols: int,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    min_cell: int = 192,
    title: str | None = None,
) -> Image.Image:
    """A labelled grid. Small images are upscaled (nearest) to ``min_cell`` pixels so that labels, sized
    relative to the cell, stay legible whatever the generation size."""
    first = next(c for c in cells if c is not None)
    w, h = first.size
    scale = max(1, math.ceil(min_cell / max(1, min(w, h))))
    cw, ch = w * scale, h * scale
    fsize = max(12, min(cw, ch) // 10)
    f = font(fsize)
    pad = fsize // 2
    left = _text_width(row_labels, f) + 2 * pad if row_labels else 0
    lh = _line_height(f)  # of multi-line labels ("cfg\nw=7.5")
    col_lines = max((len(str(lab).split("\n")) for lab in col_labels), default=0)
    top = (fsize + 2 * pad if title else 0) + (fsize + 2 * pad + (col_lines - 1) * lh if col_lines else 0)
    out = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, pad), title, fill="black", font=f)
    for j, lab in enumerate(col_labels):  # bottom-aligned: each label's last line sits just above the cells
        x = left + j * cw + cw // 2
        lines = str(lab).split("\n")
        for n, line in enumerate(lines):
            d.text((x, top - pad - (len(lines) - 1 - n) * lh), line, fill="black", font=f, anchor="ms")
    for i, lab in enumerate(row_labels):
        y = top + i * ch + ch // 2
        _multiline(d, (pad, y), str(lab), f)
    for k, cell in enumerate(cells):
        if cell is None:
            continue
        r, c = divmod(k, cols)
        out.paste(cell.resize((cw, ch), Image.NEAREST), (left + c * cw, top + r * ch))
    return out


def _text_width(labels: Sequence[str], f: ImageFont.ImageFont) -> int:
    width = 0
    for lab in labels:
        for line in str(lab).split("\n"):
            width = max(width, int(f.getlength(line)))
    return width


def _line_height(f: ImageFont.ImageFont) -> int:
    return int(f.size * 1.2)


def _multiline(d: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, f: ImageFont.ImageFont) -> None:
    lines = text.split("\n")
    lh = _line_height(f)
    x, y = xy
    y0 = y - lh * len(lines) // 2
    for n, line in enumerate(lines):
        d.text((x, y0 + n * lh), line, fill="black", font=f)
