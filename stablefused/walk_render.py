"""A walk's tensors: the keyframes' noise and conditioning, made once, and each chunk of frames through the one
loop (:meth:`stablefused.pipeline.Sampler.sample`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from stablefused.families import Conditioning
from stablefused.runs import Run, image_size
from stablefused.sampling import Request
from stablefused.walkers import Frame, Keys, WalkContext, Walker, derived_seed

# --------------------------------------------------------------------------------------------- tensors
def make_keys(run: Run, keyframes: list, h: int, w: int) -> Keys:
    """Each keyframe's noise (as text-to-image draws it, one generator per seed) and prompt embedding (one
    prompt at a time, so no frame depends on how many keyframes there are)."""
    sampler, steps = run.sampler, int(run.cfg.steps)
    noise = torch.cat([sampler.initial_latents([k.seed], h, w, steps=steps)[0] for k in keyframes])
    conds: dict[str, Conditioning] = {}
    for k in keyframes:
        if k.prompt not in conds:
            conds[k.prompt] = sampler.encode([k.prompt])
    sigma = sampler.init_noise_sigma

    def extra_noise(seed: int, stream: int, n: int) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        gen = torch.Generator("cpu").manual_seed(derived_seed(seed, stream))
        return randn_tensor((n, *noise.shape[1:]), generator=gen, device=noise.device, dtype=noise.dtype) * sigma

    conditioning = Conditioning.cat([conds[k.prompt] for k in keyframes])
    return Keys(noise=noise, cond=conditioning.embeds, seeds=[k.seed for k in keyframes], extra_noise=extra_noise,
                conditioning=conditioning)


def frame_generator(run: Run, seed: int, h: int, w: int) -> torch.Generator:
    """The scheduler's generator for a frame: its keyframe seed's, after drawing the initial noise (as in
    text-to-image), made afresh per frame."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    run.sampler.family.noise([g], h, w)  # drawn and dropped: the state text-to-image leaves the generator in
    return g


def render(run: Run, walker: Walker, frames: list[Frame], keys: Keys, uncond: Conditioning, steps: int,
           hooks: list | None = None, samples: list[dict] | None = None, previous: Any = None):
    """One chunk of frames through the one loop (``Sampler.sample``)."""
    cfg = run.cfg
    h, w = image_size(cfg)
    device, dtype = run.components.device, run.components.dtype
    latents = walker.noise(frames, keys).to(device, dtype)
    cond = keys.conditioning.map(lambda t: walker.text(frames, replace(keys, cond=t))).to(device, dtype)
    k = len(keys.noise)
    gens = [frame_generator(run, keys.seeds[walker.seed_keyframe(f, k)], h, w) for f in frames]
    scales = [float(cfg.guidance_scales[0])] * len(frames)
    request = Request(latents, cond, uncond.expand(len(frames)), scales, steps, generators=gens, samples=samples,
                      eta=cfg.eta)
    hooks = list(hooks or [])
    if walker.needs_previous_image:
        extra = dict(walker.condition(frames, previous, keys, walk_context(run)))
        if "images" in extra:  # frames the walker made itself (zoom: crops between its outpainted keyframes)
            return made_frames(run, extra, latents, cond, uncond, samples)
        hooks += list(extra.pop("hooks", []))
        request = replace(request, **extra)  # latents, start_step, extra_channels
    # this chunk's steps and per-frame scheduler noise seeds (DPM-SDE's Brownian trees), as txt2img sets them
    run.sampler.prepare(steps, [keys.seeds[walker.seed_keyframe(f, k)] for f in frames],
                        start_step=request.start_step, height=h, width=w)
    return run.sampler.sample(request, guidance=run.guidance, hooks=hooks, progress=cfg.progress)


def made_frames(run: Run, extra: dict, latents: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                samples: list[dict] | None):
    """A :class:`Generation` of frames a walker made without the loop (``condition`` returned ``images``,
    float (B, H, W, 3) in [0, 1]); ``stats`` = the UNet work it did for them (counted in the run's)."""
    from stablefused.hooks import LoopContext
    from stablefused.pipeline import Generation

    stats = {"unet_rows": 0, "model_calls": 0, **extra.get("stats", {})}
    ctx = LoopContext(latents=latents, cond=cond, uncond=uncond, base_scales=torch.zeros(len(latents)),
                      timesteps=torch.zeros(0), scheduler=run.sampler.scheduler, family=run.sampler.family,
                      samples=samples or [], stats=stats)
    return Generation(np.asarray(extra["images"], np.float32), latents, ctx)


def walk_context(run: Run) -> WalkContext:
    """The :class:`WalkContext` of a walk: ``paint`` runs text-to-image or inpainting (task=inpaint's
    :func:`~stablefused.tasks.inpaint.inpaint`) at the walk's settings; an inpainting model paints a
    blank image where text-to-image is asked for (it cannot run text-to-image)."""
    import hashlib
    import json

    from PIL import Image

    from stablefused.runs import fingerprint
    from stablefused.tasks.inpaint import inpaint, unet_kind

    cfg = run.cfg
    h, w = image_size(cfg)

    def paint(prompt: str, seed: int, image: Any = None, mask: Any = None, strength: float = 1.0):
        scale, neg = float(cfg.guidance_scales[0]), cfg.negative_prompt
        common = dict(steps=int(cfg.steps), guidance=run.guidance, eta=cfg.eta, progress=cfg.progress)
        if image is None and unet_kind(run.components) == 9:
            image, mask, strength = Image.new("RGB", (w, h)), Image.new("L", (w, h), 255), 1.0
        if image is None:
            gen = run.sampler.txt2img([prompt], [seed], [scale], neg, height=h, width=w, **common)
        else:
            gen = inpaint(run.sampler, [image], [mask], [prompt], [seed], [scale], strength, neg, **common)
        return gen.images, {k: gen.context.stats[k] for k in ("unet_rows", "model_calls")}

    text = json.dumps(fingerprint(cfg), sort_keys=True, default=str)
    return WalkContext(height=h, width=w, latent_pixel=run.components.vae_scale_factor, paint=paint, path=run.path,
                       add_artifact=run.add_artifact, tag=hashlib.sha1(text.encode()).hexdigest()[:16])
