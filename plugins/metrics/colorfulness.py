"""``colorfulness``: saturation and colourfulness of each image (how guidance over-saturates)."""

from __future__ import annotations

import numpy as np

from stablefused.registry import register


@register("metrics", "colorfulness")
class Colorfulness:
    """Per image: ``colorfulness`` (Hasler & Süsstrunk 2003, "Measuring colourfulness in natural images":
    M = σ_rgyb + 0.3 μ_rgyb with rg = R − G, yb = (R + G)/2 − B on 0..255 RGB) and ``saturation`` (mean HSV
    saturation in [0, 1]). High guidance scales push both up; APG/CFG-Zero*/TCFG are designed to hold them down."""

    def __call__(self, images, records):
        out = []
        for image in images:
            a = np.asarray(image.convert("RGB"), dtype=np.float64)
            r, g, b = a[..., 0], a[..., 1], a[..., 2]
            rg, yb = r - g, 0.5 * (r + g) - b
            m = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
            sat = np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0
            out.append({"colorfulness": float(m), "saturation": float(sat)})
        return out
