"""``walker=zoom``: an infinite zoom (or pan) made by outpainting, one keyframe per prompt."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stablefused.registry import register
from stablefused import masks as mk
from stablefused.outputs import to_uint8
from stablefused.walkers import Frame, WalkContext, Walker, check_choice

log = logging.getLogger(__name__)
MODES = ("zoom", "pan")
TAG_KEY = "stablefused_zoom"  # PNG text chunk of a keyframe: the settings that made it
DIRECTIONS = {"zoom": ("out", "in"), "pan": ("right", "left", "down", "up")}


# ------------------------------------------------------------------------------------------ geometry
def shrink(image: Image.Image, factor: float, multiple: int) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """``image`` shrunk by ``factor`` into the middle of a black canvas of its size, the mask of the new
    border (white = paint) and the inner box (x0, y0, x1, y1). The box lies on the ``multiple``-pixel grid
    (the VAE's latent pixels), so the latent mask holds exactly the border."""
    w, h = image.size
    iw = min(w - 2 * multiple, max(multiple, round(w * factor / (2 * multiple)) * 2 * multiple))
    ih = min(h - 2 * multiple, max(multiple, round(h * factor / (2 * multiple)) * 2 * multiple))
    x0, y0 = (w - iw) // 2, (h - ih) // 2
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(image.resize((iw, ih), Image.LANCZOS), (x0, y0))
    mask = Image.new("L", (w, h), 255)
    ImageDraw.Draw(mask).rectangle([x0, y0, x0 + iw - 1, y0 + ih - 1], fill=0)
    return canvas, mask, (x0, y0, x0 + iw, y0 + ih)


def shift(image: Image.Image, dx: int, dy: int) -> tuple[Image.Image, Image.Image]:
    """``image`` moved by (-dx, -dy) (the view moves by (dx, dy)) and the mask of the uncovered strip."""
    w, h = image.size
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(image, (-dx, -dy))
    mask = Image.new("L", (w, h), 255)
    ImageDraw.Draw(mask).rectangle([max(0, -dx), max(0, -dy), min(w, w - dx) - 1, min(h, h - dy) - 1], fill=0)
    return canvas, mask


def _layer(img: Image.Image, size: tuple[int, int], a: float, ox: float, oy: float) -> Image.Image:
    """``img`` on a transparent canvas of ``size``, scaled by ``a`` with its origin at (ox, oy) (bicubic,
    sub-pixel: the motion between frames is smooth at any speed)."""
    return img.convert("RGBA").transform(size, Image.AFFINE, (1 / a, 0, -ox / a, 0, 1 / a, -oy / a),
                                         resample=Image.BICUBIC, fillcolor=(0, 0, 0, 0))


def zoom_frame(inner: Image.Image, outer: Image.Image, box: Sequence[int], p: float) -> Image.Image:
    """Position ``p`` of the zoom out from ``inner`` (p = 0, exactly) to ``outer`` (p = 1, exactly), where
    ``inner`` appears shrunk at ``box`` in ``outer``. The view's size changes geometrically (a constant zoom
    speed) and its centre moves from the box's to the image's in step; ``inner`` is drawn over its box at
    its own resolution (the detail ``outer`` lost by shrinking it)."""
    if p <= 0:
        return inner.copy()
    if p >= 1:
        return outer.copy()
    w, h = outer.size
    x0, y0, x1, y1 = box
    k0 = (x1 - x0) / w
    k = k0 ** (1 - p)  # the view's width, as a fraction of outer's
    u = (k - k0) / (1 - k0)  # 0 at the box, 1 at the whole image
    cx, cy = (x0 + x1) / 2 * (1 - u) + w / 2 * u, (y0 + y1) / 2 * (1 - u) + h / 2 * u
    a = 1 / k  # output pixels per outer pixel
    ox, oy = w / 2 - cx * a, h / 2 - cy * a
    out = _layer(outer, (w, h), a, ox, oy)
    out.alpha_composite(_layer(inner, (w, h), a * (x1 - x0) / inner.width, ox + x0 * a, oy + y0 * a))
    return out.convert("RGB")


def pan_frame(first: Image.Image, second: Image.Image, dx: int, dy: int, p: float) -> Image.Image:
    """Position ``p`` of the pan from ``first`` to ``second`` = ``first`` moved by (-dx, -dy) and its strip
    painted: the view slides by p·(dx, dy) over the two."""
    if p <= 0:
        return first.copy()
    if p >= 1:
        return second.copy()
    size = first.size
    out = _layer(second, size, 1.0, dx * (1 - p), dy * (1 - p))
    out.alpha_composite(_layer(first, size, 1.0, -dx * p, -dy * p))
    return out.convert("RGB")


# ------------------------------------------------------------------------------------------ walker
@register("walkers", "zoom")
class Zoom(Walker):
    """Infinite zoom by outpainting: keyframe i+1 = keyframe i shrunk by ``factor`` with the new border
    painted (task=inpaint's way: any model; an inpainting model via model.path=), the frames between them
    crops that zoom smoothly. ``direction``: out (from the first prompt's image outwards) or in (the same
    frames reversed). ``mode=pan`` shifts by ``shift`` of the side instead (direction right|left|down|up)."""

    paces_itself = True  # a constant zoom speed; pacing=even does not apply
    needs_previous_image = True  # frames one at a time, in order
    makes_frames = True  # condition() returns crops between keyframes: no loop runs for a frame
    ranges = {"factor": (0.1, 0.9), "shift": (0.05, 0.9), "strength": (0.01, 1.0), "mask_blur": (0, None)}

    def __init__(self, mode: str = "zoom", direction: str = "out", factor: float = 0.5, shift: float = 0.25,
                 strength: float = 1.0, mask_blur: float = 1.0):
        super().__init__()
        check_choice(mode, MODES, "walker.mode")
        check_choice(direction, DIRECTIONS[mode], "walker.direction" + (" (mode=pan)" if mode == "pan" else ""))
        self.mode, self.direction = mode, direction
        self.factor, self.shift, self.strength, self.mask_blur = float(factor), float(shift), float(strength), \
            float(mask_blur)
        self.images: dict[int, Image.Image] = {}  # keyframe images, made (or read back) in order
        self.boxes: dict[int, tuple[int, ...]] = {}  # where keyframe j-1 lies in keyframe j (box, or shift)
        self.prompts: list[str] = []

    def check_walk(self, walk, keyframes, problems) -> None:
        super().check_walk(walk, keyframes, problems)
        if walk.loop:
            problems.append("loop=true: walker=zoom cannot return to its start (each keyframe contains the last); "
                            "use loop=false")

    def plan(self, walk, keyframes) -> list[Frame]:
        frames = super().plan(walk, keyframes)
        self.prompts = [k.prompt for k in keyframes]
        if self.direction in ("in",):  # the zoom out, backwards: frame f shows zoom-out frame n-1-f
            out = super().plan(walk, keyframes)
            for f, g in zip(frames, reversed(out)):
                f.segment, f.position = g.segment, g.position
        for f in frames:
            f.meta.update(mode=self.mode, direction=self.direction)
        return frames

    # -------------------------------------------------------------------------------- keyframes
    def _step(self, image: Image.Image, multiple: int) -> tuple[Image.Image, Image.Image, Any]:
        """The next keyframe's source and mask, and where the previous one lies in it."""
        if self.mode == "zoom":
            return shrink(image, self.factor, multiple)
        w, h = image.size
        d = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[self.direction]
        side = w if d[0] else h
        n = max(multiple, round(side * self.shift / multiple) * multiple)
        src, mask = shift(image, d[0] * n, d[1] * n)
        return src, mask, (d[0] * n, d[1] * n)

    def keyframe(self, j: int, keys, ctx: WalkContext) -> tuple[Image.Image, dict]:
        """Keyframe ``j``'s image: text-to-image for the first, then each outpainted from the one before (read
        back from ``zoom/keyframe_<j>.png`` when a resumed walk already made it). Returns the UNet work spent."""
        stats = {"unet_rows": 0, "model_calls": 0}
        if j in self.images:
            return self.images[j], stats
        prev = None
        if j > 0:
            prev, s = self.keyframe(j - 1, keys, ctx)
            stats = {k: stats[k] + s[k] for k in stats}
        path = ctx.path("zoom", f"keyframe_{j:03d}.png")
        prompt, seed = self.prompts[j], keys.seeds[j]
        if prev is not None:
            src, mask, where = self._step(prev, ctx.latent_pixel)
            self.boxes[j] = where
        tag = f"{ctx.tag}:{j}"  # what made keyframe j: the run's output settings (as resume compares them) and j
        img = None
        if path.is_file():  # a resumed walk's keyframe, if this config made it (not a stale one left behind)
            with Image.open(path) as old:
                img = old.convert("RGB") if getattr(old, "text", {}).get(TAG_KEY) == tag else None
        if img is None:
            if prev is None:
                arr, spent = ctx.paint(prompt, seed)
            else:
                soft = mask.filter(ImageFilter.GaussianBlur(self.mask_blur)) if self.mask_blur > 0 else mask
                arr, spent = ctx.paint(prompt, seed, src, soft, self.strength)
                arr = mk.paste_back(arr, [src], [soft])
            for k in stats:
                stats[k] += spent[k]
            from PIL.PngImagePlugin import PngInfo

            img = Image.fromarray(to_uint8(arr)[0])
            info = PngInfo()
            info.add_text(TAG_KEY, tag)
            img.save(path, pnginfo=info)
        ctx.add_artifact(path, "image", caption=f"zoom keyframe {j}: {prompt} (seed {seed})", log_key=f"keyframe_{j:03d}",
                         keyframe=j, prompt=prompt, seed=seed)
        self.images[j] = img
        return img, stats

    def condition(self, frames, previous, keys, ctx: WalkContext) -> dict:
        out, stats = [], {"unet_rows": 0, "model_calls": 0}
        for fr in frames:
            a, b = fr.segment, fr.segment + 1
            first, s1 = self.keyframe(a, keys, ctx)
            if fr.position <= 0:
                img, s2 = first, {}
            else:
                second, s2 = self.keyframe(b, keys, ctx)
                if self.mode == "zoom":
                    img = zoom_frame(first, second, self.boxes[b], fr.position)
                else:
                    img = pan_frame(first, second, *self.boxes[b], fr.position)
            for s in (s1, s2):
                for k in s:
                    stats[k] += s[k]
            out.append(np.asarray(img, np.float32) / 255.0)
        return {"images": np.stack(out), "stats": stats}
