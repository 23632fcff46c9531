from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stablefused import records as rec_io
from stablefused.preview import compose
from stablefused.registry import PluginError, register

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


@register("visualizers", "attention_maps")
class AttentionMaps:
    """Per-token cross-attention heat maps over the final image, one row per prompt (sample).

    Each token's map (from the ``attention`` recorder, at latent resolution) is upscaled bilinearly to the
    image and divided by its own maximum (so every heat map spans [0, 1]: it shows *where* a token attends,
    not how much compared with other tokens), coloured with ``cmap`` and blended over the image with
    ``alpha``. Samples without a conditional pass (guidance 0) have no maps. ``tokens``: which prompt tokens
    (null = all but BOS/EOS/padding; else words, matched without the ``</w>`` suffix). ``samples``: global
    sample indices (null = all recorded). Needs recorder ``attention``.
    """

    ranges = {"samples": (0, None), "alpha": (0, 1), "min_cell": (1, 4096)}

    run_params = {"tokens": "list", "samples": "images"}

    def __init__(self, tokens: list[str] | None = None, samples: list[int] | None = None, alpha: float = 0.6,
                 cmap: str = "jet", min_cell: int = 96, filename: str = "attention_maps"):
        self.tokens = None if tokens is None else [str(t).lower() for t in tokens]
        self.samples = None if samples is None else [int(s) for s in samples]
        if not 0 <= float(alpha) <= 1:
            raise PluginError("visualizers.attention_maps: alpha must be in [0, 1]")
        self.alpha, self.cmap, self.min_cell, self.name = float(alpha), str(cmap), int(min_cell), str(filename)

    @classmethod
    def requires(cls, params: dict) -> list[str]:
        return ["attention"]

    def overlay(self, image: Image.Image, amap: np.ndarray) -> Image.Image:
        import matplotlib

        m = Image.fromarray(amap.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR)
        m = np.asarray(m)
        m = m / m.max() if m.max() > 0 else m
        heat = matplotlib.colormaps[self.cmap](m)[..., :3]
        base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        out = (1 - self.alpha) * base + self.alpha * heat
        return Image.fromarray((out * 255).round().astype(np.uint8))

    def __call__(self, run: Any) -> list[Path]:
        rec_io.require(run, "attention_maps", ["attention"])
        rec = rec_io.from_run(run)
        if "attention" not in rec:
            raise PluginError("visualizers.attention_maps: nothing recorded for attention")
        maps = rec["attention"].float().numpy()  # (N, T, h, w)
        info = rec.info("attention")
        tokens = info.get("tokens", {})
        counts = info.get("maps_averaged") or [1] * maps.shape[0]
        finals = {int(r["index"]): img for r, img in zip(run.records, run.images)}
        cells, labels, row_labels = [], [], []
        for p, m in enumerate(rec.samples("attention")):
            idx = int(m["index"])
            if self.samples is not None and idx not in self.samples:
                continue
            toks = tokens.get(str(idx), [])
            chosen = [(k, t) for k, t in enumerate(toks) if t not in SPECIAL
                      and (self.tokens is None or t.lower() in self.tokens) and k < maps.shape[1]]
            image = finals.get(idx)
            if image is None:
                continue
            if not counts[p]:  # guidance 0: the loop skipped the conditional pass, there is no map
                chosen = []
            cells.append([image] + [self.overlay(image, maps[p, k]) for k, _ in chosen])
            labels.append(["image" if counts[p] else "no cond. pass"] + [t for _, t in chosen])
            g = m.get("guidance_scale")
            row_labels.append(textwrap.shorten(str(m.get("prompt", "")), 24, placeholder="…")
                              + (f" w={float(g):g}" if g is not None else ""))
        if not cells:
            raise PluginError(f"visualizers.attention_maps: no recorded sample matches samples={self.samples}")
        img = compose(cells, labels, row_labels, title="cross-attention per token (each map scaled to its max)",
                      min_cell=self.min_cell)
        path = run.path(f"{self.name}.png")
        img.save(path)
        run.add_artifact(path, "image", caption="cross-attention heat maps per prompt token", log_key=self.name)
        return [path]
