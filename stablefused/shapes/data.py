"""Synthetic coloured-shapes dataset: 32x32 RGB images of one shape on a plain background, with prompts.

Attributes (the vocabulary of the bundled ``shapes`` model):

* colour: red, green, blue, yellow, purple (the shape's fill)
* shape: circle, square, triangle
* size: small (side 9-11 px), large (side 18-22 px)
* background: black, white

Every item is a pure function of its seed (numpy ``default_rng``), drawn without anti-aliasing. Prompts
always name the colour and shape; size and background are named about half the time each (when a prompt
does not name one, the image still has one, drawn at random). Word order varies ("a small red circle",
"a red circle, small", "a red circle on a black background", "black background, a red circle"), and every
form parses back with :func:`stablefused.shapes.classify.parse_prompt`.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (9, 11), "large": (18, 22)}  # side length range, px
ATTRIBUTES = ("color", "shape", "size", "background")
CHOICES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "background": tuple(BACKGROUNDS)}
FILLER_WORDS = ("a", "an", "the", "on", "background", "shape", "image", "of", "in", "is", "that")
VOCABULARY = tuple(dict.fromkeys(FILLER_WORDS + tuple(COLORS) + SHAPES + tuple(SIZES) + tuple(BACKGROUNDS)))
MARGIN = 1


def shape_mask(shape: str, side: int, top: int, left: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` with bounding box side ``side`` at (top, left)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    y, x = yy - top, xx - left
    inside = (y >= 0) & (y < side) & (x >= 0) & (x < side)
    if shape == "square":
        return inside
    if shape == "circle":
        r = side / 2
        return (y - r) ** 2 + (x - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom of the box
        half = (y / side) * side / 2  # half width at row y
        return inside & (np.abs(x - side / 2) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict[str, str], rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``attrs`` (all four attributes) at a random position: (image float32 (H, W, 3) in [0, 1], mask)."""
    lo, hi = SIZES[attrs["size"]]
    side = int(rng.integers(lo, hi + 1))
    top = int(rng.integers(MARGIN, size - side - MARGIN + 1))
    left = int(rng.integers(MARGIN, size - side - MARGIN + 1))
    mask = shape_mask(attrs["shape"], side, top, left, size)
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[attrs["background"]]
    img[mask] = COLORS[attrs["color"]]
    return img, mask


def make_prompt(attrs: dict[str, str], named: set[str], rng: np.random.Generator) -> str:
    """A prompt naming the attributes in ``named`` (colour and shape always), in one of several forms."""
    color, shape = attrs["color"], attrs["shape"]
    size = attrs["size"] if "size" in named else None
    bg = attrs["background"] if "background" in named else None
    form = int(rng.integers(0, 4))
    if size and form == 1:
        core = f"a {color} {shape}, {size}"
    elif size and form == 2:
        core = f"a {color} {size} {shape}"
    elif size:
        core = f"a {size} {color} {shape}"
    else:
        core = f"a {color} {shape}"
    if bg is None:
        return core
    if int(rng.integers(0, 3)) == 0:
        return f"{bg} background, {core}"
    return f"{core} on a {bg} background"


def random_attrs(rng: np.random.Generator) -> dict[str, str]:
    return {k: CHOICES[k][int(rng.integers(0, len(CHOICES[k])))] for k in ATTRIBUTES}


def sample(seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict[str, str], str]:
    """Dataset item number ``seed``: (image (H, W, 3) float32 in [0, 1], all four attributes, prompt)."""
    imgs, attrs, prompts, _ = batch([seed], size)
    return imgs[0], attrs[0], prompts[0]


def batch(seeds, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[dict[str, str]], list[str], np.ndarray]:
    """Items for ``seeds``: images (N, H, W, 3), attributes, prompts, foreground masks (N, H, W)."""
    imgs, attrs, prompts, masks = [], [], [], []
    for s in seeds:
        rng = np.random.default_rng([20240, int(s)])
        a = random_attrs(rng)
        named = {"color", "shape"}
        if rng.random() < 0.5:
            named.add("size")
        if rng.random() < 0.5:
            named.add("background")
        img, m = render(a, rng, size)
        imgs.append(img)
        masks.append(m)
        attrs.append(a)
        prompts.append(make_prompt(a, named, rng))
    return np.stack(imgs), attrs, prompts, np.stack(masks)


def items(seeds, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Training items for ``seeds``: images, prompts, foreground masks (what the training script reads)."""
    imgs, _, prompts, masks = batch(seeds, size)
    return imgs, prompts, masks


def image_for(attrs: dict[str, str], seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """An image with the given (complete) attributes at a seed-dependent position and side."""
    return render(attrs, np.random.default_rng([777, int(seed)]), size)[0]
