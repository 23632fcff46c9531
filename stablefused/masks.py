"""Inpainting masks (white = repaint, black = keep): from a file or a shape spec, fitted like the image,
blurred, checked, and pasted back.

* ``mask_image``: a greyscale image file (any mode: RGB, RGBA, palette, 16-bit are converted to 8-bit
  greyscale, said once in the log), or a list/folder of them, one per source image (or one for all).
* ``mask``: shape specs in the source image's pixels, ``rect:x0,y0,x1,y1`` (corners, x1/y1 exclusive) or
  ``circle:cx,cy,r``; a list of specs is their union. On the command line write ``mask=[rect:2,4,28,30]``
  (Hydra reads a bare ``a,b`` as a sweep) or quote it: ``mask="'rect:2,4,28,30'"``.

A mask whose size differs from its image's is resized to it (said in the log), then fitted to the output
size with the image's ``resize`` policy (:func:`stablefused.images.fit`), then blurred by ``mask_blur``
pixels (diffusers' ``VaeImageProcessor.blur``: a Gaussian; null: :func:`default_blur`, by the output size). That one soft mask is what the model gets
(binarised at 0.5 by diffusers' mask processor, as ``StableDiffusionInpaintPipeline`` does) and what pastes
the output back over the source (:func:`paste_back`, diffusers' ``VaeImageProcessor.apply_overlay``): pixels
where it is 0 are the source's exactly; the blur is the seam, and it reaches into the pixels the given mask
keeps (:func:`unchanged_outside` measures them against the given mask, so that change is counted).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stablefused import images as im
from stablefused.errors import ConfigError

log = logging.getLogger(__name__)

SHAPES = {"rect": 4, "circle": 3}
_NUM = r"-?\d+(?:\.\d+)?"


@dataclass
class Mask:
    spec: str  # the file's path, or the shape specs joined by " + "
    image: Image.Image | None  # 8-bit greyscale ("L") at its own size (files); None for shape specs
    converted: str | None = None
    shapes: list[tuple[str, list[float]]] | None = None  # shape specs: drawn at each source's size


MAX_COORD = 1e6  # pixels: far beyond any source image, and where PIL's drawing still works


def _specs(value: Any) -> list[str]:
    """Mask shape specs of a ``mask`` value: a string, a list of them, or the list Hydra makes of
    ``mask=[rect:2,4,28,30]`` (['rect:2', 4, 28, 30]): items are joined and split before each shape name."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    text = ",".join(str(v).strip() for v in items)
    return [s.strip() for s in re.split(r",(?=\s*[A-Za-z])", text) if s.strip()]


def parse_shape(spec: str, key: str = "mask") -> tuple[str, list[float]]:
    """``rect:x0,y0,x1,y1`` / ``circle:cx,cy,r`` -> (kind, numbers); a one-line ConfigError otherwise."""
    m = re.fullmatch(rf"\s*(\w+)\s*:\s*({_NUM}(?:\s*,\s*{_NUM})*)\s*", spec)
    kind = m.group(1).lower() if m else spec.split(":", 1)[0].strip().lower()
    if kind not in SHAPES or not m:
        raise ConfigError(f"{key}={spec!r}: not a mask shape; use rect:x0,y0,x1,y1 or circle:cx,cy,r (pixels of the "
                          "source image), or mask_image=<greyscale file, white = repaint>")
    nums = [float(x) for x in m.group(2).split(",")]
    if not all(math.isfinite(x) and abs(x) <= MAX_COORD for x in nums):
        raise ConfigError(f"{key}={spec!r}: coordinates must be finite numbers of pixels (|x| <= {MAX_COORD:g})")
    if len(nums) != SHAPES[kind]:
        raise ConfigError(f"{key}={spec!r}: {kind} takes {SHAPES[kind]} numbers "
                          f"({'x0,y0,x1,y1' if kind == 'rect' else 'cx,cy,r'}), got {len(nums)}")
    if kind == "rect" and (nums[2] <= nums[0] or nums[3] <= nums[1]):
        raise ConfigError(f"{key}={spec!r}: the rectangle is empty (need x1 > x0 and y1 > y0)")
    if kind == "circle" and nums[2] <= 0:
        raise ConfigError(f"{key}={spec!r}: the radius must be > 0")
    return kind, nums


def draw(shapes: Sequence[tuple[str, list[float]]], size: tuple[int, int]) -> Image.Image:
    """The union of ``shapes`` as a white-on-black "L" mask of ``size`` = (width, height)."""
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    for kind, n in shapes:
        if kind == "rect":
            d.rectangle([n[0], n[1], n[2] - 1, n[3] - 1], fill=255)  # x1, y1 exclusive: rect:0,0,8,8 = 8x8 px
        else:
            cx, cy, r = n
            d.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    return mask


def to_grey(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit greyscale of any mode (RGB/RGBA via :func:`stablefused.images.to_rgb`: transparency counts as
    white, i.e. repaint), and what was converted."""
    if img.mode == "L":
        return img.copy(), None
    if img.mode == "1":
        return img.convert("L"), None
    rgb, note = im.to_rgb(img)
    return rgb.convert("L"), f"{img.mode} -> 8-bit greyscale" + (f" ({note})" if note and "transparency" in note else "")


def check(cfg: Any) -> list[tuple[str, Any]]:
    """The masks ``mask_image`` / ``mask`` name, cheaply (before any model loads): a list of
    (name, file path or shape list). Raises a one-line ConfigError."""
    has_file, has_shape = cfg.get("mask_image") not in (None, "", []), cfg.get("mask") not in (None, "", [])
    if has_file and has_shape:
        raise ConfigError("mask_image and mask: both set; give one (mask_image=<file> or mask=rect:x0,y0,x1,y1)")
    if not has_file and not has_shape:
        raise ConfigError("mask_image: not set; give a mask (white = repaint), e.g. mask_image=mask.png, or a shape "
                          "mask=rect:x0,y0,x1,y1 / mask=circle:cx,cy,r in pixels of the source image")
    if has_shape:
        specs = _specs(cfg.mask)
        return [(" + ".join(specs), [parse_shape(s) for s in specs])]
    out = []
    for spec in im._specs(cfg.mask_image):
        for f in im._files(spec, "mask_image"):
            im.open_image(f, "mask_image")  # decodes completely: truncated, corrupt or bomb files fail here
            out.append((str(f), f))
    return out


def load(found: Sequence[tuple[str, Any]]) -> list[Mask]:
    """The masks :func:`check` found, decoded (files) or kept as shapes (drawn per source size)."""
    out = []
    for name, what in found:
        if isinstance(what, list):
            out.append(Mask(name, None, shapes=what))
            continue
        grey, note = to_grey(im.open_image(Path(what), "mask_image"))
        if note:
            log.info("mask_image=%s: converted %s", what, note)
        out.append(Mask(name, grey, converted=note))
    return out


def pair(masks: Sequence[Mask], n_sources: int) -> list[Mask]:
    """One mask per source: a single mask serves every source; otherwise the counts must match."""
    if len(masks) == 1:
        return list(masks) * n_sources
    if len(masks) != n_sources:
        raise ConfigError(f"mask_image: {len(masks)} masks for {n_sources} source images; give one mask for all, "
                          "or one per source (same order: sorted by name for folders)")
    return list(masks)


def fitted(mask: Mask, source_size: tuple[int, int], policy: str, height: int, width: int, blur: float,
           where: str = "") -> Image.Image:
    """The mask for a source of ``source_size`` (w, h): drawn or resized to it, fitted like the image
    (``resize`` policy) to ``width`` x ``height``, blurred by ``blur`` pixels. "L" mode."""
    if mask.shapes is not None:
        m = draw(mask.shapes, source_size)
    else:
        m = mask.image
        if m.size != source_size:
            log.info("mask_image=%s: %dx%d mask resized to the image's %dx%d%s", mask.spec, *m.size, *source_size,
                     where)
            m = m.resize(source_size, Image.BILINEAR)
    m = im.fit(m.convert("RGB"), policy, height, width).convert("L")  # padding (resize=pad) is kept (black)
    if blur and blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))  # = diffusers' VaeImageProcessor.blur(mask, blur)
    return m


def default_blur(height: int, width: int) -> float:
    """``mask_blur=null``: a blur that suits the output size, min(height, width) / 128 pixels (diffusers' 4 at
    512 px; a fixed 4 px would spread the seam over a quarter of a 32 px image)."""
    return min(int(height), int(width)) / 128


def blur_of(value: Any, height: int, width: int) -> float:
    """The blur in pixels a ``mask_blur`` setting gives at this output size."""
    return default_blur(height, width) if value is None else float(value)


def repaint_fraction(mask: Image.Image) -> float:
    """Fraction of pixels the model repaints: >= 0.5 after diffusers' binarisation."""
    return float((np.asarray(mask, np.float32) / 255.0 >= 0.5).mean())


def box(mask: Image.Image) -> list[int] | None:
    """Bounding box [x0, y0, x1, y1] (x1/y1 exclusive) of the repainted pixels (>= 0.5), None if none."""
    ys, xs = np.nonzero(np.asarray(mask, np.float32) / 255.0 >= 0.5)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def processor(vae_scale_factor: int):
    """diffusers' mask processor, as ``StableDiffusionInpaintPipeline`` builds it (greyscale, binarised, [0, 1])."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def paste_back(images: np.ndarray, sources: Sequence[Image.Image], masks: Sequence[Image.Image]) -> np.ndarray:
    """Float outputs (B, H, W, 3) in [0, 1] -> the same with each source laid over its output where the mask
    is black, through the mask's blur (diffusers' ``VaeImageProcessor.apply_overlay``), as uint8/255."""
    from diffusers.image_processor import VaeImageProcessor

    from stablefused.outputs import to_uint8

    out = []
    for img, src, m in zip(to_uint8(images), sources, masks):
        over = VaeImageProcessor.apply_overlay(None, m, src, Image.fromarray(img))
        out.append(np.asarray(over, np.float32) / 255.0)
    return np.stack(out)


def unchanged_outside(images: np.ndarray, sources: Sequence[Image.Image], masks: Sequence[Image.Image]) -> list[float]:
    """Per image: mean absolute change (0-1), vs the source, of the pixels the mask keeps. ``masks``: the
    masks as the user gave them (fitted, not blurred), kept = below 0.5; so a blur whose seam spreads into
    the kept pixels shows here, instead of being measured only beyond the seam."""
    out = []
    for img, src, m in zip(images, sources, masks):
        keep = np.asarray(m, np.float32) / 255.0 < 0.5
        a = np.asarray(src, np.float32) / 255.0
        out.append(float(np.abs(img[keep] - a[keep]).mean()) if keep.any() else 0.0)
    return out

