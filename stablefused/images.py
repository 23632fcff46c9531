"""Input images for the image-conditioned tasks (img2img, inpainting): load, convert, fit, encode, noise.

* :func:`check` (in ``validate``, before any model loads) and :func:`load` (in ``run``) read an ``init_image``
  spec: a PNG/JPEG file, a folder of them (sorted by name; one grid row each), or ``shapes:<description>``
  (an image drawn by the shapes dataset renderer, e.g. ``shapes:a red circle on a black background``; size
  large and background black unless named; its description is the text after ``shapes:``).
  Palette, RGBA/LA (composited on white), 16-bit and greyscale images are converted to 8-bit RGB, said once
  in the log. Problems are one-line :class:`~stablefused.errors.ConfigError` naming the key and the fix.
* :func:`target_size` + :func:`fit`: the ``resize`` policy. The output has the image's own size (rounded to
  the model's ``size_multiple``) unless ``height``/``width`` are given, as in diffusers:

  - ``crop``: centre-crop to the target aspect (or to the size multiple), then resize;
  - ``pad``: pad (black, centred) to the target aspect (or up to the size multiple), then resize;
  - ``stretch``: resize to the target (rounded down to the size multiple), aspect not kept.

  A first image whose output would exceed ``max_size`` times the model's native side is refused.
* :func:`to_pixels`: PIL → tensor in [-1, 1] with diffusers' ``VaeImageProcessor.preprocess``.
* :func:`encode`: the VAE's output per image; ``Family.image_latents`` draws ``retrieve_latents(..., generator)``
  from it, scaled as the family's pipeline scales it
  per image with its own generator, as ``StableDiffusionImg2ImgPipeline.prepare_latents`` does (the
  deterministic encoder pass is kept per image, so a source used by many cells is encoded once).
* :func:`noised_latents`: the noise drawn from the same generators after the VAE sample, then
  ``scheduler.add_noise`` at the first timestep.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from stablefused.errors import ConfigError, first_line

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
RESIZE_POLICIES = ("crop", "pad", "stretch")
SHAPES_PREFIX = "shapes:"


@dataclass
class InitImage:
    spec: str  # what names it: the file's path, or the shapes: spec
    image: Image.Image  # 8-bit RGB, as loaded (before the resize policy)
    description: str | None = None  # what it shows, when known (shapes: specs)
    converted: str | None = None  # e.g. "RGBA -> RGB (composited on white)"


# ----------------------------------------------------------------------------------------- specs
def _specs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        items = [value]
    return [str(v) for v in items]


def _files(spec: str, key: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise ConfigError(f"{key}={spec}: folder holds no {'/'.join(e[1:] for e in EXTENSIONS)} images; "
                              "put images there or name one file")
        return files
    if not path.exists():
        raise ConfigError(f"{key}={spec}: no such file or folder; give the path of a PNG/JPEG image or a "
                          "folder of them")
    return [path]


def _shapes_attrs(spec: str, key: str) -> dict[str, str]:
    from stablefused.shapes.classify import parse_prompt

    desc = spec[len(SHAPES_PREFIX):].strip()
    attrs = parse_prompt(desc)
    if "color" not in attrs or "shape" not in attrs:
        raise ConfigError(f"{key}={spec!r}: a shapes: source must name a colour and a shape, e.g. "
                          f"'{SHAPES_PREFIX}a large red circle on a black background'")
    return {"size": "large", "background": "black", **attrs}


MAX_INPUT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb warning threshold
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning,
               EOFError, IndexError, struct.error)


def open_image(path: Path, key: str) -> Image.Image:
    """The image in ``path`` decoded completely, as the run uses it: EXIF orientation applied (a photo shown
    upright is upright here, and its width and height are the shown ones). The one reader of input files
    (sources and masks), in validation and in the run, so both see the same pixels and size. A file that is
    not an image, is truncated or corrupt, or claims more than ``MAX_INPUT_PIXELS`` (a decompression bomb) is
    one ConfigError line naming ``key`` and the file."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_INPUT_PIXELS:
                    raise ConfigError(f"{key}={path}: {w}x{h} pixels ({w * h / 1e6:.0f} Mpx) is more than an input "
                                      f"image may have ({MAX_INPUT_PIXELS / 1e6:.0f} Mpx, decompression-bomb guard); "
                                      "downscale it first")
                im.load()
                return ImageOps.exif_transpose(im)
    except ConfigError:
        raise
    except READ_ERRORS as e:  # PIL: UnidentifiedImageError, truncated data, bad CRC, bombs
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ConfigError(f"{key}={path}: too many pixels for an input image (decompression-bomb guard: "
                              f"{first_line(e, 100)}); downscale it first") from None
        what = "empty file" if path.is_file() and path.stat().st_size == 0 else \
            f"{type(e).__name__}: {first_line(e, 100)}" if str(e) else type(e).__name__
        raise ConfigError(f"{key}={path}: cannot read it as an image ({what}); give a complete, valid PNG or JPEG "
                          "file") from None


def check(value: Any, key: str = "init_image") -> list[tuple[str, tuple[int, int]]]:
    """Check of an ``init_image`` value, before the model loads: every file exists and decodes completely
    (:func:`open_image`). Returns ``(name, (width, height))`` per image, EXIF orientation applied (as the
    run sees it); raises ConfigError."""
    out = []
    specs = _specs(value)
    if not specs:
        raise ConfigError(f"{key}=[]: name at least one image (a path, a folder or shapes:<description>)")
    for spec in specs:
        if spec.startswith(SHAPES_PREFIX):
            _shapes_attrs(spec, key)
            from stablefused.shapes.data import IMAGE_SIZE

            out.append((spec, (IMAGE_SIZE, IMAGE_SIZE)))
            continue
        for f in _files(spec, key):
            out.append((str(f), open_image(f, key).size))
    return out


def load(value: Any, key: str = "init_image") -> list[InitImage]:
    """The images an ``init_image`` value names, decoded and converted to 8-bit RGB."""
    out = []
    for spec in _specs(value):
        if spec.startswith(SHAPES_PREFIX):
            from stablefused.shapes.data import image_for

            attrs = _shapes_attrs(spec, key)
            arr = image_for(attrs, seed=0)
            img = Image.fromarray((arr * 255).round().astype(np.uint8))
            # described in the user's words: only what they named is scored as faithfulness
            out.append(InitImage(spec, img, description=spec[len(SHAPES_PREFIX):].strip()))
            continue
        for f in _files(spec, key):
            img, note = to_rgb(open_image(f, key))
            if note:
                log.info("%s: converted %s", f, note)
            out.append(InitImage(str(f), img, converted=note))
    return out


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB of any PIL mode, and what was converted (None when it already was RGB)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy(), None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit / 32-bit greyscale
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255) else \
            (1.0 if mode == "F" and a.max(initial=0) <= 1.0 else 255.0)
        grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode} (high bit depth greyscale) -> 8-bit RGB"
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "P (palette with transparency)"
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} -> RGB (transparency composited on white)"
    return im.convert("RGB"), f"{mode} -> RGB"


# ----------------------------------------------------------------------------------------- resize
def target_size(size: tuple[int, int], policy: str, multiple: int, height: int | None = None,
                width: int | None = None) -> tuple[int, int]:
    """Output (height, width) for an image of ``size`` = (width, height): ``height``/``width`` where given,
    else the image's side rounded to ``multiple`` (down for crop/stretch, up for pad; at least ``multiple``)."""
    w, h = size

    def side(v: int) -> int:
        if policy == "pad":
            return max(multiple, math.ceil(v / multiple) * multiple)
        return max(multiple, v - v % multiple)

    return int(height or side(h)), int(width or side(w))


def fit(image: Image.Image, policy: str, height: int, width: int) -> Image.Image:
    """Apply the resize ``policy`` so that the image is ``width`` x ``height`` (centre-crop / pad to the
    target aspect with integer boxes, then a Lanczos resize only if the size still differs)."""
    if policy not in RESIZE_POLICIES:
        raise ConfigError(f"resize={policy!r}: must be one of {', '.join(RESIZE_POLICIES)}")
    w, h = image.size
    if policy == "crop":
        if w * height > h * width:  # too wide: keep the full height
            cw, ch = max(1, round(h * width / height)), h
        else:
            cw, ch = w, max(1, round(w * height / width))
        if (cw, ch) != (w, h):
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
    elif policy == "pad":
        if w * height > h * width:  # too wide: pad top and bottom
            pw, ph = w, max(h, round(w * height / width))
        else:
            pw, ph = max(w, round(h * width / height)), h
        if (pw, ph) != (w, h):
            canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
            canvas.paste(image, ((pw - w) // 2, (ph - h) // 2))
            image = canvas
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def check_size(name: str, size: tuple[int, int], out: tuple[int, int], model: Any, max_size: float,
               key: str = "init_image", given: tuple[bool, bool] = (False, False)) -> None:
    """Refuse an output far larger than the model's native size (``max_size`` x its side, per side)."""
    nh, nw = int(model.height), int(model.width)
    oh, ow = out
    # as config's height/width check (which names a side that was set): a quarter of the trained size is noise
    if (oh * 4 <= nh and not given[0]) or (ow * 4 <= nw and not given[1]):
        raise ConfigError(
            f"{key}={name}: a {size[0]}x{size[1]} image gives {ow}x{oh} outputs, far below model {model.name}'s "
            f"{nw}x{nh} (a quarter or less per side: no recognisable images); set height={nh} width={nw} to resize it")
    if oh > max_size * nh or ow > max_size * nw:
        raise ConfigError(
            f"{key}={name}: a {size[0]}x{size[1]} image gives {ow}x{oh} outputs, far larger than model "
            f"{model.name}'s {nw}x{nh} (limit max_size={max_size:g} x per side); set height={nh} width={nw} to "
            f"resize it, or raise max_size")


# ----------------------------------------------------------------------------------------- tensors
def to_pixels(images: Sequence[Image.Image], vae_scale_factor: int):
    """(B, 3, H, W) float tensor in [-1, 1]: diffusers' ``VaeImageProcessor.preprocess`` (as the pipelines)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(list(images))


def encode(vae: Any, pixels) -> list[Any]:
    """The VAE encoder's output per image (batch of one each, as the pipeline encodes with a generator list);
    sample latents from them with ``Family.image_latents``."""
    import torch

    with torch.no_grad():
        from diffusers.utils.torch_utils import get_module_execution_device

        # where its forward runs: with CPU offload the weights sit on the CPU (or meta) until then
        pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        return [vae.encode(pixels[i : i + 1]) for i in range(len(pixels))]


def noised_latents(scheduler: Any, init_latents, generators: Sequence[Any], timestep):
    """Noise from each image's generator (drawn after its VAE sample), added at ``timestep`` (a 1-element
    tensor: the first timestep that runs) with ``scheduler.add_noise``. Returns (latents, noise)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(init_latents.shape, generator=list(generators), device=init_latents.device,
                         dtype=init_latents.dtype)
    t = timestep.reshape(-1)[:1].repeat(init_latents.shape[0])
    return add_noise(scheduler, init_latents, noise, t), noise


def add_noise(scheduler: Any, x0, noise, t):
    """``x0`` noised to timestep(s) ``t``: ``scale_noise`` for flow-matching schedulers (SD3, Flux: their
    img2img/inpaint pipelines call it), ``add_noise`` for the others."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t.reshape(-1)[:1], noise)
    return scheduler.add_noise(x0, noise, t)
