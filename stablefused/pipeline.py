"""Text-to-image on top of the one loop: encode prompts → initial latents → :func:`denoise` → decode.

Other tasks reuse these pieces (``encode``, ``initial_latents``, ``decode``) and call the same
:func:`stablefused.sampling.denoise` with their own latents, embeddings or extra channels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from stablefused.errors import NonFiniteError
from stablefused.guidance import Guidance
from stablefused.hooks import LoopContext
from stablefused.models import Components
from stablefused.sampling import denoise
from stablefused.text import known_words, unknown_words

log = logging.getLogger(__name__)


FRAMES_PER_DECODE = 8  # video frames per VAE call: a whole batch of videos at once would not fit in memory


log = logging.getLogger("stablefused")
_WARNED_LONG: set[tuple[str, int]] = set()  # (prompt, window): each too-long prompt is warned about once


def warn_truncated(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Warn once per prompt that does not fit the text encoder's window, saying how many tokens are dropped."""
    window = int(tokenizer.model_max_length)
    for p in dict.fromkeys(prompts):
        if (p, window) in _WARNED_LONG or not p:
            continue
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > window:
            _WARNED_LONG.add((p, window))
            log.warning("prompt %r: %d tokens, the text encoder reads %d; the last %d are dropped",
                        p if len(p) <= 60 else p[:57] + "...", n, window, n - window)


@dataclass
class Generation:
    images: np.ndarray  # (B, H, W, 3) float32 in [0, 1]; video: (B, F, H, W, 3)
    latents: torch.Tensor  # final latents
    context: LoopContext


class Sampler:
    def __init__(self, components: Components, scheduler: Any | None = None):
        self.c = components
        self.scheduler = scheduler if scheduler is not None else components.make_scheduler()
        self._known_words: set[str] | None | bool = False  # False: not looked up yet
        self._checked_prompts: set[str] = set()

    def warn_unknown_words(self, prompts: Sequence[str]) -> None:
        """Once per prompt, warn about words a word-level tokenizer (the bundled ``shapes`` model,
        ``tiny_random``) does not know: the model silently ignores them."""
        if self._known_words is False:
            self._known_words = known_words(self.c.tokenizer)
        if self._known_words is None:
            return
        for p in dict.fromkeys(prompts):
            if p in self._checked_prompts:
                continue
            self._checked_prompts.add(p)
            unknown = unknown_words(p, self._known_words)
            if unknown:
                log.warning("model %s does not know the word%s %s in prompt %r: it ignores them", self.c.name,
                            "s" if len(unknown) > 1 else "", ", ".join(repr(w) for w in unknown), p)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, L, D), as diffusers' ``encode_prompt`` computes them (no clip skip). Words the
        model does not know are named once per prompt (:meth:`warn_unknown_words`)."""
        self.warn_unknown_words(prompts)
        tok = self.c.tokenizer
        warn_truncated(tok, prompts)
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.c.device)
        return self.c.text_encoder(ids)[0].to(self.c.dtype)

    def prepare(self, steps: int, seeds: Sequence[int]) -> list[torch.Generator]:
        """Set the scheduler to this batch's ``steps`` and return one CPU generator per image. Every task
        calls this before it draws noise or reads the scheduler's timesteps/σ.

        σ-schedulers (Euler, LMS, Heun, KDPM2, …) derive ``init_noise_sigma`` from the timesteps, so the
        scheduler is set to them first, as diffusers' pipeline does (``retrieve_timesteps`` before
        ``prepare_latents``). Read before that, a fresh scheduler gives σ of the full training schedule and one
        left from an earlier call that call's σ."""
        self.scheduler.set_timesteps(steps, device=self.c.device)
        if hasattr(self.scheduler, "noise_sampler_seed") and self.scheduler.config.get("noise_sampler_seed") is None:
            # DPMSolverSDEScheduler ignores `generator`: its noise is a Brownian tree seeded by
            # noise_sampler_seed, random when unset and one tree for the whole batch when an int. One tree
            # per image, seeded by its seed, keeps the image reproducible and independent of its batch.
            self.scheduler.noise_sampler_seed = [int(s) for s in seeds]
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def initial_latents(self, seeds: Sequence[int], height: int, width: int, frames: int | None = None, *,
                        steps: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Noise per image from its own CPU generator: an image depends on its seed only (not on the
        device, the batch size or its neighbours). The generators are returned for the scheduler's noise."""
        from diffusers.utils.torch_utils import randn_tensor  # here: importing diffusers costs ~1.5 s

        generators = self.prepare(steps, seeds)
        f = self.c.vae_scale_factor
        shape = (len(seeds), self.c.vae.config.latent_channels)  # not the UNet's: an inpainting UNet takes 9
        shape += (frames,) if frames else ()
        shape += (height // f, width // f)
        latents = randn_tensor(shape, generator=generators, device=self.c.device, dtype=self.c.dtype)
        return latents * self.scheduler.init_noise_sigma, generators

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Latents → float images (B, H, W, 3) in [0, 1], in batches of ``batch_size``. Video latents
        (B, C, F, H, W) → frames (B, F, H, W, 3), decoded as images (as ``TextToVideoSDPipeline.decode_latents``)
        in batches of ``batch_size`` frames (default :data:`FRAMES_PER_DECODE`)."""
        if latents.ndim == 5:
            b, c, f, h, w = latents.shape
            frames = self.decode(latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w),
                                 batch_size or FRAMES_PER_DECODE)
            return frames.reshape(b, f, *frames.shape[1:])
        vae = self.c.vae
        out = []
        n = batch_size or len(latents)
        for chunk in latents.split(n):
            img = vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            if not bool(torch.isfinite(img).all()):  # would be written as a black image
                raise NonFiniteError(f"decode: the VAE returned NaN/inf ({vae.dtype}); likely float16 overflow in the "
                                     "VAE, try dtype=float32 or bfloat16")
            out.append((img / 2 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def txt2img(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scales: Sequence[float] | float = 7.5,
        negative_prompts: Sequence[str] | str = "",
        *,
        steps: int = 20,
        height: int | None = None,
        width: int | None = None,
        **sample_kw: Any,
    ) -> Generation:
        """Text to image: prompts → embeddings, seeds → noise, then :meth:`sample` (``sample_kw``: guidance,
        hooks, samples, eta, progress)."""
        n = len(prompts)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * n
        if isinstance(guidance_scales, (int, float)):
            guidance_scales = [float(guidance_scales)] * n
        if not (len(seeds) == len(negative_prompts) == len(guidance_scales) == n):
            raise ValueError("prompts, seeds, negative_prompts and guidance_scales must have the same length")
        default = self.c.unet.config.sample_size * self.c.vae_scale_factor
        height, width = height or default, width or default
        cond, uncond = self.encode(prompts), self.encode(negative_prompts)
        latents, generators = self.initial_latents(seeds, height, width, steps=steps)
        return self.sample(latents, cond, uncond, guidance_scales, steps=steps, generators=generators, **sample_kw)

    @torch.no_grad()
    def sample(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance_scales: Sequence[float],
        *,
        steps: int,
        generators: list[torch.Generator] | None = None,
        start_step: int = 0,
        extra_channels: torch.Tensor | None = None,
        guidance: Guidance | None = None,
        hooks: Sequence[Any] = (),
        samples: list[dict] | None = None,
        eta: float = 0.0,
        progress: bool = True,
    ) -> Generation:
        """Prepared latents and embeddings → :func:`denoise` → decoded images. Every task ends here."""
        need = int(self.c.unet.config.in_channels)
        have = latents.shape[1] + (0 if extra_channels is None else extra_channels.shape[1])
        if need != have:  # e.g. an inpainting model (latents + mask + masked image) under task=txt2img
            from stablefused.errors import ConfigError

            hint = " (an inpainting model: use task=inpaint)" if need == 2 * latents.shape[1] + 1 else ""
            raise ConfigError(f"model={self.c.name}: its UNet takes {need} input channels, this task gives it "
                              f"{have}{hint}")
        latents, ctx = denoise(
            self.c.unet, self.scheduler, latents, cond, uncond, guidance_scales, num_steps=steps,
            guidance=guidance, hooks=hooks, generators=generators, start_step=start_step,
            extra_channels=extra_channels, eta=eta, samples=samples, progress=progress,
        )
        return Generation(self.decode(latents), latents, ctx)
