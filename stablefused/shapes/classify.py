"""Read a shapes image back into attributes, and a prompt into the attributes it names.

The classifier is analytic (no weights): background = nearest of black/white to the median border pixel;
foreground = pixels far from that background; the largest 4-connected foreground blob is the shape. Its
colour is the nearest palette colour to the mean of its core pixels. Shape and size come from template
matching: the blob's soft coverage (projection of each pixel on the background -> colour axis) is compared
with anti-aliased circles, squares and triangles of sides around the blob's extent, at offsets around its
bounding box; the best fit gives the shape, and its side gives small/large. Blur (VAE reconstructions,
generated images) shifts edges but not which template fits best.
An image without a blob gets ``None`` for colour, shape and size (scored as wrong).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import numpy as np

from stablefused.shapes.data import ATTRIBUTES, BACKGROUNDS, CHOICES, COLORS, SHAPES, SIZES, VOCABULARY, shape_mask

FOREGROUND_DISTANCE = 0.4  # RGB distance from the background colour that counts as foreground
LARGE_MIN_SIDE = 15  # side (px, at 32x32) from which a shape is "large" (small: 9-11, large: 18-22)
_PALETTE = np.array(list(COLORS.values()), np.float32)
_BGS = np.array(list(BACKGROUNDS.values()), np.float32)


KNOWN_WORDS = frozenset(VOCABULARY) | {s + "s" for s in SHAPES}  # the model's words, plural shapes too


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` the shapes model never saw in training (in order, once each): it ignores them,
    e.g. "a purple hexagon on a grey background" -> ["hexagon", "grey"]."""
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in KNOWN_WORDS))


def parse_prompt(prompt: str) -> dict[str, str]:
    """Attributes a prompt names: a subset of {"color", "shape", "size", "background"} -> value.

    Colour words are the shape colours; "black"/"white" name the background (they are never shape
    colours). Plural shapes ("circles") count. Unknown words are ignored here (see :func:`unknown_words`).
    """
    out: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLORS:
            out.setdefault("color", word)
        elif word in BACKGROUNDS:
            out.setdefault("background", word)
        elif word in SIZES:
            out.setdefault("size", word)
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            out.setdefault("shape", word.rstrip("s") if word not in SHAPES else word)
    return out


def to_array(image: Any) -> np.ndarray:
    """PIL image, uint8 or float array (H, W, 3) -> float32 (H, W, 3) in [0, 1]."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32)[..., :3], 0.0, 1.0)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of ``mask``, each as a boolean mask, in scan order."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    out = []
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        comp, queue = [], deque([(sy, sx)])
        seen[sy, sx] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        region = np.zeros_like(mask, bool)
        ys, xs = zip(*comp)
        region[list(ys), list(xs)] = True
        out.append(region)
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    regions = connected_components(mask)
    return max(regions, key=lambda r: int(r.sum())) if regions else np.zeros_like(mask, bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


_TEMPLATES: dict[tuple[str, int], np.ndarray] = {}


def _template(shape: str, side: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (side+2, side+2) of ``shape`` with bounding box ``side`` at offset (1, 1)."""
    key = (shape, side)
    if key not in _TEMPLATES:
        n = side + 2
        m = shape_mask(shape, side * ss, ss, ss, n * ss).astype(np.float32)
        _TEMPLATES[key] = m.reshape(n, ss, n, ss).mean((1, 3))
    return _TEMPLATES[key]


def _fit_template(soft: np.ndarray, blob: np.ndarray) -> tuple[str, int]:
    """The (shape, side) whose drawn template, placed near the blob's bounding box, best matches ``soft``."""
    h, w = soft.shape
    ys, xs = np.nonzero(blob)
    top, left = int(ys.min()), int(xs.min())
    extent = int(max(ys.max() - top, xs.max() - left)) + 1
    pad = 4  # windows start up to 3 px before the box and reach extent + 4 px into it: room for the largest
    canvas = np.zeros((h + pad + max(h, w) + 8, w + pad + max(h, w) + 8), np.float32)
    canvas[pad : pad + h, pad : pad + w] = soft
    total = float((soft**2).sum())
    best, best_err = ("circle", extent), np.inf
    for shape in SHAPES:
        for side in range(max(3, extent - 2), extent + 3):
            t = _template(shape, side)
            n = t.shape[0]
            for dy in (-2, -1, 0, 1):
                for dx in (-2, -1, 0, 1):
                    y0, x0 = pad + top + dy - 1, pad + left + dx - 1
                    if y0 < 0 or x0 < 0:
                        continue
                    win = canvas[y0 : y0 + n, x0 : x0 + n]
                    # error over the whole image = error inside the window + soft mass outside it
                    err = float(((win - t) ** 2).sum()) + total - float((win**2).sum())
                    if err < best_err:
                        best, best_err = (shape, side), err
    return best


def classify_image(image: Any) -> dict[str, str | None]:
    """Colour, shape, size and background of a shapes image (PIL or array); ``None`` where no shape."""
    img = to_array(image)
    h, w, _ = img.shape
    scale = h / 32.0
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    bg_idx = int(np.argmin(((_BGS - bg_rgb) ** 2).sum(-1)))
    out: dict[str, str | None] = {"background": CHOICES["background"][bg_idx], "color": None, "shape": None, "size": None}
    dist = np.sqrt(((img - _BGS[bg_idx]) ** 2).sum(-1))
    blob = _largest_component(dist > FOREGROUND_DISTANCE)
    area = int(blob.sum())
    if area < 3 * scale * scale:
        return out
    d = dist[blob]
    core = img[blob][d >= np.median(d)]
    out["color"] = CHOICES["color"][int(np.argmin(((_PALETTE - core.mean(0)) ** 2).sum(-1)))]
    fg = _PALETTE[CHOICES["color"].index(out["color"])]
    axis = fg - _BGS[bg_idx]
    soft = np.clip(((img - _BGS[bg_idx]) @ axis) / float(axis @ axis), 0.0, 1.0)  # 0 = background, 1 = shape
    soft = np.where(_dilate(blob), soft, 0.0)  # only the blob (and its edge): ignore other specks
    shape, side = _fit_template(soft, blob)
    out["shape"] = shape
    out["size"] = "large" if side >= LARGE_MIN_SIDE * scale else "small"
    return out


def score(predicted: dict[str, str | None], prompt: str | dict[str, str], unknown: int = 0) -> dict[str, float]:
    """1.0/0.0 per attribute the prompt names (NaN for the others), plus their mean, in which each of
    ``unknown`` words the model does not know counts as one more unmet request (0.0)."""
    wanted = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    out = {a: (float(predicted.get(a) == wanted[a]) if a in wanted else float("nan")) for a in ATTRIBUTES}
    vals = [v for v in out.values() if v == v] + [0.0] * unknown
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out
