"""``task=inpaint``: repaint the white part of a mask towards the prompt, as ``StableDiffusionInpaintPipeline``
does it step for step, through the one loop, with either kind of UNet:

* a 9-channel inpainting UNet (``runwayml``-style, in_channels = 2 x latent channels + 1): the mask (at latent
  size) and the masked image's latents are the loop's ``extra_channels``, concatenated to every UNet input;
* an ordinary 4-channel UNet: after every step the known region (mask 0) is replaced by the source's latents
  noised to the next timestep (:class:`BlendKnown`, an ``on_step`` hook: the pipeline's
  ``latents = (1 - init_mask) * init_latents_proper + init_mask * latents``).

Which one runs follows from the loaded model's UNet (``model.path=<inpainting folder>`` picks the first by
itself). The random draws per image, from its own generator, are the pipeline's: the source's VAE sample
(when needed: 4-channel UNets, or strength < 1), the noise, the masked image's VAE sample. ``strength`` as
in img2img (``Family.first_step``); 1.0 starts from pure noise. Masks: :mod:`stablefused.masks`.

With ``paste_back`` (default) every output is laid back over its source through the (blurred) mask: pixels
the mask keeps entirely are the source's exactly. Records carry ``mask``, ``mask_blur``, ``mask_box`` (the
repainted region's bounding box: ``metrics.shapes_adherence.region=mask_box`` scores just that crop),
``strength``, ``paste_back`` and ``outside_change`` (the mean absolute change, 0-1, of the pixels the given
mask keeps, measured against that mask before the blur: the blur's seam reaches into them).
"""

from __future__ import annotations

import logging
from numbers import Real
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from stablefused import images as im
from stablefused import masks as mk
from stablefused.errors import ConfigError
from stablefused.hooks import BaseHook, LoopContext, StepState
from stablefused.pipeline import Generation, Sampler
from stablefused.runs import Run, log_samples_table, summarise_metrics
from stablefused.tasks import register_task
from stablefused.sampling import Request
from stablefused.tasks.img2img import Img2Img

log = logging.getLogger(__name__)


class BlendKnown(BaseHook):
    """4-channel UNets: after each step, keep the known region from the source, noised to the next timestep
    (the last step keeps it clean), exactly as ``StableDiffusionInpaintPipeline`` does for them. Put it first
    among the hooks: the recorders then see the blended ``x_prev``."""

    def __init__(self, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, scheduler: Any):
        self.image_latents, self.noise, self.mask, self.scheduler = image_latents, noise, mask, scheduler
        self.timesteps: torch.Tensor | None = None

    def before_loop(self, ctx: LoopContext) -> None:
        self.timesteps = ctx.timesteps  # the steps that run (after start_step)
        return None

    def on_step(self, state: StepState) -> torch.Tensor:
        proper = self.image_latents
        if state.index < len(self.timesteps) - 1:
            proper = im.add_noise(self.scheduler, proper, self.noise, self.timesteps[state.index + 1].reshape(1))
        return (1 - self.mask) * proper + self.mask * state.x_prev


def unet_kind(components: Any) -> int:
    """9 for an inpainting network (latents + mask + masked-image latents), 4 for an ordinary one; a
    ConfigError for any other input width."""
    lat, inp = components.family.latent_channels, components.family.in_channels
    if inp == lat:
        return 4
    if inp == 2 * lat + 1:
        return 9
    raise ConfigError(f"model={components.name}: its network takes {inp} input channels; inpainting needs {lat} (an "
                      f"ordinary model) or {2 * lat + 1} (an inpainting model: latents + mask + masked image)")


@torch.no_grad()
def inpaint(
    sampler: Sampler,
    sources: Sequence[Image.Image],
    masks: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scales: Sequence[float],
    strength: float = 1.0,
    negative_prompts: Sequence[str] | str = "",
    *,
    steps: int = 20,
    encoded: Sequence[Any] | None = None,
    masked_encoded: Sequence[Any] | None = None,
    guidance: Any = None,
    hooks: Sequence[Any] = (),
    samples: list[dict] | None = None,
    eta: float = 0.0,
    progress: bool = True,
) -> Generation:
    """One batch of inpainting at one ``strength``: ``sources`` (RGB) and ``masks`` ("L", white = repaint),
    all of one size, one per prompt/seed/scale. Returns the decoded outputs, not pasted back (see
    :func:`stablefused.masks.paste_back`). ``encoded`` / ``masked_encoded``: :func:`stablefused.images.encode`
    outputs of the sources / masked sources, when the caller keeps them (each is encoded once)."""
    from diffusers.utils.torch_utils import randn_tensor

    c, scheduler = sampler.c, sampler.scheduler
    n = len(prompts)
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * n
    if steps - sampler.family.first_step(steps, strength) < 1:
        raise ValueError(f"strength {strength} x steps {steps} runs no step")
    kind, f = unet_kind(c), c.vae_scale_factor
    pixels = im.to_pixels(sources, f).to(torch.float32)
    height, width = pixels.shape[-2:]
    mask_cond = mk.processor(f).preprocess(list(masks), height=height, width=width)  # (B, 1, H, W) in {0, 1}
    cond, uncond, negative = sampler.conditions(prompts, negative_prompts, guidance)

    t_start = sampler.family.first_step(steps, strength)
    generators = sampler.prepare(steps, seeds, start_step=t_start, height=height, width=width)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    is_max = strength == 1.0
    shape = (n, int(c.vae.config.latent_channels), height // f, width // f)
    # per generator, in the pipeline's order: the source's VAE sample, the noise, the masked image's sample
    image_latents = None
    if kind == 4 or not is_max:
        if encoded is None:
            encoded = im.encode(c.vae, pixels)
        # contiguous, as the pipeline's repeat() leaves it: the VAE's sample can come out channels-last, and
        # the blend would pass that layout on to the UNet's input (another conv kernel, ~1e-6 apart)
        image_latents = sampler.family.image_latents(encoded, generators).contiguous()
    if is_max:
        noise = randn_tensor(shape, generator=generators, device=c.device, dtype=c.dtype)
        latents = noise * sampler.init_noise_sigma
    else:
        latents, noise = im.noised_latents(scheduler, image_latents, generators, timesteps[:1])
    mask = torch.nn.functional.interpolate(mask_cond, size=shape[-2:]).to(device=c.device, dtype=c.dtype)
    if kind == 9:
        if masked_encoded is None:
            masked_encoded = im.encode(c.vae, pixels * (mask_cond < 0.5))
        masked_latents = sampler.family.image_latents(masked_encoded, generators)
        extra, hooks = torch.cat([mask, masked_latents], dim=1), list(hooks)
    else:
        # The pipeline encodes the masked image for every UNet and samples it from each generator; a
        # 4-channel UNet does not use it, so draw what that sample draws (the stochastic schedulers' noise
        # comes after it) without the VAE pass.
        for g in generators:
            randn_tensor((1, *shape[1:]), generator=g, device=c.device, dtype=c.vae.dtype)
        extra, hooks = None, [BlendKnown(image_latents, noise, mask, scheduler), *hooks]
    latents = sampler.family.from_spatial(latents)  # Flux packs after noising (BlendKnown works in spatial)
    request = Request(latents, cond, uncond, list(guidance_scales), steps, start_step=t_start, extra_channels=extra,
                      generators=generators, samples=samples, eta=eta, negative=negative)
    return sampler.sample(request, guidance=guidance, hooks=hooks, progress=progress)


def mask_overlay(source: Image.Image, mask: Image.Image) -> Image.Image:
    """The source with the repainted region shown: lightened through the mask."""
    tint = Image.new("RGB", source.size, (255, 255, 255))
    return Image.composite(Image.blend(source, tint, 0.4), source, mask)


@register_task("inpaint")
class Inpaint(Img2Img):
    """Inpainting: rows = source x prompt/seed, columns = source with its mask | strength x guidance."""

    types = {**Img2Img.types, "mask_image": Union[str, list[str], None], "mask": Union[str, list, None],  # Hydra splits rect:4,2,14,12 into mixed items
             "mask_blur": Optional[Real]}
    input_settings = ("init_image", "mask_image")

    def validate(self, cfg: Any, problems: list[str]) -> None:
        before = len(problems)
        super().validate(cfg, problems)  # init_image, strengths, resize, max_size, recorders
        blur, bad_blur = cfg.get("mask_blur"), False
        if blur is not None and (isinstance(blur, bool) or not isinstance(blur, Real) or not blur >= 0):
            problems.append(f"mask_blur={blur!r}: must be a number of pixels >= 0 (0: no blur; null: by the "
                            "image size)")
            bad_blur = True
        if not isinstance(cfg.get("paste_back"), bool):
            problems.append(f"paste_back={cfg.get('paste_back')!r}: must be true or false")
        try:
            found = mk.check(cfg)
        except ConfigError as e:
            problems.append(str(e))
            return
        if len(problems) > before or bad_blur:
            return  # the sources or their size are wrong: the masks cannot be fitted to them yet
        try:  # the masks as the model will get them: cheap, and an empty one fails before the model loads
            sources = im.check(cfg.init_image)
            height, width = self.output_size(cfg, sources[0][0], sources[0][1], cfg.max_size)
            blur = mk.blur_of(blur, height, width)
            masks = mk.pair(mk.load(found), len(sources))
            for (name, size), m in zip(sources, masks):
                fm = mk.fitted(m, size, cfg.resize, height, width, blur)
                if mk.repaint_fraction(fm) == 0:
                    key = "mask" if m.shapes is not None else "mask_image"
                    raise ConfigError(
                        f"{key}={m.spec}: all black over {name} (no pixel >= 0.5 after resize={cfg.resize} to "
                        f"{width}x{height}"
                        + (f" and mask_blur={blur:g}" if blur else "") + "): nothing to repaint; white marks the "
                        "region to repaint" + (" (the shape lies outside the image?)" if m.shapes else ""))
        except ConfigError as e:
            problems.append(str(e))

    def run(self, run: Run) -> None:
        cfg = run.cfg
        kind = unet_kind(run.components)
        sources = im.load(cfg.init_image)
        height, width = self.output_size(cfg, sources[0].spec, sources[0].image.size, cfg.max_size)
        fitted = [im.fit(s.image, cfg.resize, height, width) for s in sources]
        masks = mk.pair(mk.load(mk.check(cfg)), len(sources))
        blur = mk.blur_of(cfg.mask_blur, height, width)
        fmasks = [mk.fitted(m, s.image.size, cfg.resize, height, width, blur,
                            where=f" ({s.spec})" if len(sources) > 1 else "") for m, s in zip(masks, sources)]
        given = [mk.fitted(m, s.image.size, cfg.resize, height, width, 0) for m, s in zip(masks, sources)]
        log.info("inpainting with a %d-channel UNet (%s)", kind, "inpainting model: mask + masked image as extra "
                 "channels" if kind == 9 else "ordinary model: known region blended back at every step")
        boxes = [mk.box(m) for m in fmasks]
        for i, (s, img, m) in enumerate(zip(sources, fitted, fmasks)):  # inputs as the model sees them, first
            self.save_input(run, i, s, img, height, width)
            path = run.path("inputs", f"mask_{i:02d}.png")
            m.save(path)
            frac = mk.repaint_fraction(m)
            run.add_artifact(path, "input", caption=f"mask: {masks[i].spec}", log_key=f"mask_{i:02d}",
                             mask=masks[i].spec, mask_blur=blur, mask_box=boxes[i], repaint_fraction=frac)
            f = run.components.vae_scale_factor
            latent = torch.nn.functional.interpolate(mk.processor(f).preprocess(m), size=(height // f, width // f))
            if kind == 4 and not bool((latent >= 0.5).any()):
                log.warning("mask %s: the region is smaller than one latent pixel (%d px); a 4-channel model keeps "
                            "the whole image", masks[i].spec, run.components.vae_scale_factor)
        vae, f = run.components.vae, run.components.vae_scale_factor
        pixels = im.to_pixels(fitted, f)
        encoded = im.encode(vae, pixels)
        masked_encoded = None
        if kind == 9:
            cond = mk.processor(f).preprocess(fmasks, height=height, width=width)
            masked_encoded = im.encode(vae, pixels * (cond < 0.5))

        rows = self.rows(run, sources)
        per_source = dict(mask=lambda i: masks[i].spec, mask_blur=lambda i: blur, mask_box=lambda i: boxes[i],
                          paste_back=lambda i: bool(cfg.paste_back), unet_channels=lambda i: kind)
        for strength, cells in self.strength_cells(run, rows, sources, height, width, **per_source):
            def make(chunk: list[dict], strength=strength):
                idx = [x["source_index"] for x in chunk]
                srcs, ms = [fitted[k] for k in idx], [fmasks[k] for k in idx]
                gen = inpaint(run.sampler, srcs, ms, [x["prompt"] for x in chunk], [x["seed"] for x in chunk],
                              [x["guidance_scale"] for x in chunk], strength, cfg.negative_prompt, steps=cfg.steps,
                              encoded=[encoded[k] for k in idx],
                              masked_encoded=None if masked_encoded is None else [masked_encoded[k] for k in idx],
                              guidance=run.guidance, hooks=list(run.recorders.values()), samples=chunk,
                              eta=cfg.eta, progress=cfg.progress)
                if cfg.paste_back:
                    gen.images = mk.paste_back(gen.images, srcs, ms)
                for x, v in zip(chunk, mk.unchanged_outside(gen.images, srcs, [given[k] for k in idx])):
                    x["outside_change"] = v  # a measured number: it goes into the records as a metric
                return gen

            run.generate(cells, make, record=lambda c: self.record(run, c))

        self.save_grid(run, rows, sources, [mask_overlay(f, m) for f, m in zip(fitted, fmasks)], "source + mask",
                       f"{cfg.name}: rows source x prompt/seed, columns source+mask | strength x guidance")
        log_samples_table(run, ("init_image", "mask", "prompt", "seed", "strength", "guidance_scale"))
        summarise_metrics(run, key="strength", label="strength", filename="metrics_by_strength")
