"""Latents → RGB for pictures of the process: the model's VAE (exact, slow) or a linear preview (fast).

* ``vae``: :meth:`stablefused.pipeline.Sampler.decode` in batches; images at full resolution.
* ``linear``: ``rgb = latent · W + b`` per latent pixel (one matrix product), at latent resolution (upscale
  for display). For the Stable Diffusion 1.x/2.x VAE (also SD-Turbo) the known coefficients are shipped
  (:data:`SD_LATENT_RGB`, as used by ComfyUI's latent previews); a family may ship its VAE's known coefficients
  (``Family.latent_rgb``: SDXL's and SD3's, from ComfyUI's ``comfy/latent_formats.py``); for any other VAE
  (the tiny and bundled models) ``W, b`` are fitted by least squares: decode a few latents with the VAE,
  average-pool the images to latent resolution, solve. Fits are cached per model for the process.
* ``auto``: ``linear`` where coefficients are known, ``vae`` otherwise.

Also here: :func:`compose`, the labelled frame/strip layout the visualizers share, and :func:`one_frame`:
video runs record (..., C, F, h, w) latents; the visualizers show one frame of them (the middle one unless
told otherwise), the same frame as the run's image records.

    from stablefused.preview import make_decoder
    decode = make_decoder(sampler, "linear", fit_latents=recorded_x0)
    images = decode(latents)        # (N, H, W, 3) float32 in [0, 1]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from stablefused.outputs import font

# Stable Diffusion 1.x/2.x VAE (latents already multiplied by scaling_factor 0.18215): rows = latent
# channels, columns = R, G, B; the product lies roughly in [-1, 1] and maps to [0, 1] by (x + 1) / 2.
SD_LATENT_RGB = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])
# Stable Diffusion 3/3.5 VAE (16 channels; latents in the model's space, (z - 0.0609) * 1.5305), as ComfyUI's
# latent previews (comfy/latent_formats.py, class SD3): rgb in [-1, 1] = latents · W + b.
DECODE_MODES = ("vae", "linear", "auto")


class LinearPreview:
    """``rgb = latents · weight + bias`` per pixel, clipped to [0, 1]. ``weight`` (C, 3), ``bias`` (3,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, source: str = "fitted"):
        self.weight, self.bias, self.source = weight.float().cpu(), bias.float().cpu(), source

    @classmethod
    def sd(cls) -> "LinearPreview":
        """The known SD 1.x/2.x coefficients, with the (x + 1) / 2 range map folded in."""
        return cls(SD_LATENT_RGB / 2, torch.full((3,), 0.5), source="sd1/sd2 known coefficients")

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        x = latents.detach().to("cpu", torch.float32)
        rgb = torch.einsum("nchw,ck->nhwk", x, self.weight) + self.bias
        return rgb.clamp_(0, 1).numpy()

    @classmethod
    @torch.no_grad()
    def fit(cls, sampler: Any, latents: torch.Tensor | None = None, n_random: int = 16, seed: int = 0,
            batch_size: int = 16, max_latents: int = 32) -> "LinearPreview":
        """Least-squares fit on VAE decodes of ``latents`` (e.g. recorded x̂0; at most ``max_latents``, evenly
        spaced) plus ``n_random`` standard normal latents (in the model's scaled latent space)."""
        if latents is not None:
            shape = latents.shape[1:]
        else:  # the VAE's latent channels: a video or inpainting network's in_channels may differ
            fam = sampler.family
            shape = (fam.latent_channels, *(2 * [fam.default_size // fam.vae_scale_factor]))
        g = torch.Generator("cpu").manual_seed(seed)
        parts = [torch.randn((n_random, *shape), generator=g)]
        if latents is not None:
            if len(latents) > max_latents:
                latents = latents[torch.linspace(0, len(latents) - 1, max_latents).round().long()]
            parts.append(latents.detach().to("cpu", torch.float32))
        lat = torch.cat(parts)
        images = torch.from_numpy(sampler.decode(lat.to(sampler.c.device, sampler.c.dtype), batch_size)).permute(0, 3, 1, 2)
        f = images.shape[-1] // lat.shape[-1]
        small = torch.nn.functional.avg_pool2d(images.float(), f) if f > 1 else images.float()
        x = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1]).double()
        y = small.permute(0, 2, 3, 1).reshape(-1, 3).double()
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        sol = torch.linalg.lstsq(a, y).solution  # (C + 1, 3)
        return cls(sol[:-1].float(), sol[-1].float(), source=f"least squares on {len(lat)} VAE decodes")


def is_sd_vae(vae: Any) -> bool:
    """The Stable Diffusion 1.x/2.x autoencoder (4 latent channels, 0.18215, 128-256-512-512 blocks)."""
    cfg = vae.config
    return (cfg.latent_channels == 4 and abs(float(cfg.scaling_factor) - 0.18215) < 1e-6
            and tuple(cfg.block_out_channels) == (128, 256, 512, 512))


_FITS: dict[tuple, LinearPreview] = {}


def known_preview(sampler: Any) -> LinearPreview | None:
    """Published coefficients for the model's VAE: SD 1.x/2.x's, or the family's
    (:meth:`stablefused.families.Family.latent_rgb`); None if there are none."""
    if is_sd_vae(sampler.c.vae):
        return LinearPreview.sd()
    known = getattr(sampler.family, "latent_rgb", lambda: None)()
    if known is None:
        return None
    weight, bias, source = known  # rgb in [-1, 1]: fold in the (x + 1) / 2 range map
    return LinearPreview(torch.as_tensor(weight) / 2, torch.as_tensor(bias) / 2 + 0.5, source=source)


def linear_preview(sampler: Any, fit_latents: torch.Tensor | None = None) -> LinearPreview:
    """Known coefficients for the model's VAE, else a least-squares fit (cached per model and latent shape)."""
    c = sampler.c
    known = known_preview(sampler)
    if known is not None:
        return known
    key = (c.source or c.name, str(c.dtype), tuple(fit_latents.shape[1:]) if fit_latents is not None else None)
    if key not in _FITS:
        _FITS[key] = LinearPreview.fit(sampler, fit_latents)
    return _FITS[key]


def make_decoder(sampler: Any, mode: str = "vae", fit_latents: torch.Tensor | None = None,
                 batch_size: int = 8) -> Callable[[torch.Tensor], np.ndarray]:
    """A function latents (N, C, h, w) → images (N, H, W, 3) float32 in [0, 1]; ``linear`` images are at
    latent resolution (h, w)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r}: must be one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        mode = "linear" if known_preview(sampler) is not None else "vae"
    if mode == "linear":
        return linear_preview(sampler, fit_latents)
    c = sampler.c

    def vae(latents: torch.Tensor) -> np.ndarray:
        return sampler.decode(latents.to(c.device, c.dtype), batch_size)

    return vae


# ---------------------------------------------------------------------------------------------- layout
def to_pil(image: np.ndarray, size: tuple[int, int] | None = None, resample: int = Image.NEAREST) -> Image.Image:
    """Float (H, W, 3) in [0, 1] → PIL, resized to ``size`` (w, h) if given."""
    img = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), resample)
    return img


def hstack(images: Sequence[Image.Image], gap: int = 2, fill: str = "white") -> Image.Image:
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    h = max(i.height for i in images)
    out = Image.new("RGB", (w, h), fill)
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def compose(cells: Sequence[Sequence[Image.Image | None]], cell_labels: Sequence[Sequence[str]] | None = None,
            row_labels: Sequence[str] = (), col_labels: Sequence[str] = (), title: str | None = None,
            min_cell: int = 128, multiple: int = 1) -> Image.Image:
    """Rows of cells (any count per row), each cell upscaled (nearest) to at least ``min_cell`` pixels high,
    with an optional label under every cell, labels left of rows and above columns, and a title line. The
    canvas is padded to a multiple of ``multiple`` pixels (16 for video codecs)."""
    first = next(c for row in cells for c in row if c is not None)
    scale = max(1, math.ceil(min_cell / first.height))
    cw, ch = first.width * scale, first.height * scale
    fsize = max(10, min(ch // 9, 20))
    f = font(fsize)
    pad = max(2, fsize // 3)
    line = fsize + 2 * pad
    ncols = max(len(r) for r in cells)
    left = (max(int(f.getlength(s)) for s in row_labels) + 2 * pad) if row_labels else 0
    has_cell_labels = bool(cell_labels) and any(any(s for s in r) for r in cell_labels)
    lab_h = line if has_cell_labels else 0
    top = (line if title else 0) + (line if col_labels else 0)
    width = left + ncols * (cw + pad) + pad
    height = top + len(cells) * (ch + lab_h + pad) + pad
    width += -width % multiple
    height += -height % multiple
    out = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, pad), title, fill="black", font=f)
    for j, lab in enumerate(col_labels):
        d.text((left + pad + j * (cw + pad) + cw // 2, top - pad), str(lab), fill="black", font=f, anchor="ms")
    for i, row in enumerate(cells):
        y = top + i * (ch + lab_h + pad)
        if row_labels and i < len(row_labels):
            d.text((pad, y + ch // 2), str(row_labels[i]), fill="black", font=f, anchor="lm")
        for j, cell in enumerate(row):
            x = left + pad + j * (cw + pad)
            if cell is not None:
                out.paste(cell.resize((cw, ch), Image.NEAREST) if cell.size != (cw, ch) else cell, (x, y))
            if has_cell_labels and i < len(cell_labels) and j < len(cell_labels[i]) and cell_labels[i][j]:
                d.text((x + cw // 2, y + ch + pad), _fit(cell_labels[i][j], f, cw), fill="black", font=f,
                       anchor="ma")
    return out


def _fit(text: str, f: Any, width: int) -> str:
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def decode_to_pil(decoder: Callable[[torch.Tensor], np.ndarray], latents: torch.Tensor,
                  size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Decode a stack of latents (..., C, h, w) (any leading dims, flattened in order) to PIL images resized
    to ``size`` (w, h): bilinear when a preview is upscaled, none when the VAE already gives that size."""
    flat = latents.reshape(-1, *latents.shape[-3:])
    images = decoder(flat)
    return [to_pil(a, size, Image.BILINEAR) for a in images]


def one_frame(latents: torch.Tensor, dims: Sequence[str], frame: int | None = None) -> torch.Tensor:
    """Recorded video latents (..., C, F, h, w) (``"frame"`` in the tensor's ``dims``) → one frame
    (..., C, h, w): ``frame`` (negative counts from the end), default the middle one (F // 2), the frame a
    video run's image records show. Image latents are returned as they are."""
    if "frame" not in dims:
        return latents
    n = latents.shape[-3]
    k = n // 2 if frame is None else int(frame)
    if not -n <= k < n:
        raise IndexError(f"frame={frame}: the videos have {n} frames (0..{n - 1})")
    return latents.select(-3, k)


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` (w, h) scaled down to at most ``max_side`` pixels on its longer side (never up)."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    f = max_side / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def decoder_for(run: Any, mode: str, fit_latents: torch.Tensor | None = None,
                batch_size: int = 8) -> Callable[[torch.Tensor], np.ndarray]:
    """:func:`make_decoder` for a run's sampler (fits a linear preview on ``fit_latents`` when needed)."""
    return make_decoder(run.sampler, mode, fit_latents=fit_latents, batch_size=batch_size)
