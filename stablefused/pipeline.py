"""Text-to-image on top of the one loop: encode prompts → initial latents → :func:`denoise` → decode, for any
model family (:mod:`stablefused.families`), like a diffusers pipeline.

Other tasks reuse these pieces (``encode``, ``prepare``, ``initial_latents``, ``decode``), fill a
:class:`~stablefused.sampling.Request` with their own latents, conditioning or extra channels, and end in
:meth:`Sampler.sample`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from stablefused.families import Conditioning
from stablefused.guidance import Guidance
from stablefused.hooks import LoopContext
from stablefused.models import Components
from stablefused.sampling import Request, denoise
from stablefused.text import known_words, unknown_words

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
    latents: torch.Tensor  # final latents, spatial (B, C, H, W) whatever the family's scheduler layout
    context: LoopContext
    # the base model's loop when another model finished the images (SDXL base + refiner); ``context`` is then
    # the refiner's, and a run's compute counts both
    base_context: LoopContext | None = None

    @property
    def contexts(self) -> list[LoopContext]:
        """Every loop that made these images, in order (the base's, then the refiner's; usually one)."""
        return [c for c in (self.base_context, self.context) if c is not None]


class Sampler:
    def __init__(self, components: Components, scheduler: Any | None = None):
        self.c, self.family = components, components.family
        self.scheduler = scheduler if scheduler is not None else components.make_scheduler()
        self._known_words: set[str] | None | bool = False  # False: not looked up yet
        self._checked_prompts: set[str] = set()

    def warn_unknown_words(self, prompts: Sequence[str]) -> None:
        """Once per prompt, warn about words a word-level tokenizer (the bundled ``shapes`` model,
        ``tiny_random``) does not know: the model silently ignores them."""
        if self._known_words is False:
            self._known_words = known_words(self.family.tokenizer)
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
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        """Prompts → the family's conditioning (one row per prompt), as the family's pipeline encodes them;
        each distinct prompt is encoded once.
        ``negative``: negative prompts (SDXL zeroes empty ones where its config says so). Words the model does
        not know are named once per prompt (:meth:`warn_unknown_words`)."""
        self.warn_unknown_words(prompts)
        warn_truncated(self.family.tokenizer, prompts)
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # a seed/scale sweep repeats prompts
        if len(unique) == len(prompts):
            return self.family.encode(list(prompts), negative=negative)
        return self.family.encode(list(unique), negative=negative).select([unique[p] for p in prompts])

    def conditions(self, prompts: Sequence[str], negative_prompts: Sequence[str], guidance: Guidance | None = None
                   ) -> tuple[Conditioning, Conditioning, Conditioning | None]:
        """(cond, uncond, negative) for a request: uncond is the negative prompt, or the empty prompt when the
        guider reads the negative prompt itself (perp-neg), which then is ``negative``."""
        cond = self.encode(prompts)
        if guidance is not None and guidance.uses_negative:
            return cond, self.encode([""] * len(prompts), negative=True), self.encode(negative_prompts, negative=True)
        return cond, self.encode(negative_prompts, negative=True), None

    def prepare(self, steps: int, seeds: Sequence[int], *, start_step: int = 0, height: int | None = None,
                width: int | None = None) -> list[torch.Generator]:
        """Set the scheduler for this batch and return one CPU generator per image: the one owner of
        scheduler state. Every task calls this before it draws noise or reads the scheduler's timesteps/σ.

        The family sets the timesteps (``steps``; Flux shifts them by the image size, so give ``height`` and
        ``width``), then the begin index for runs that skip the first ``start_step`` steps (image-to-image).
        σ-schedulers (Euler, LMS, Heun, KDPM2, …) derive ``init_noise_sigma`` from the timesteps, so they are
        set first, as diffusers' pipeline does (``retrieve_timesteps`` before ``prepare_latents``)."""
        default = self.family.default_size
        self.family.set_timesteps(self.scheduler, steps, height or default, width or default)
        if start_step and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start_step * self.scheduler.order)
        if hasattr(self.scheduler, "noise_sampler_seed") and self.scheduler.config.get("noise_sampler_seed") is None:
            # DPMSolverSDEScheduler ignores `generator`: its noise is a Brownian tree seeded by
            # noise_sampler_seed, random when unset and one tree for the whole batch when an int. One tree
            # per image, seeded by its seed, keeps the image reproducible and independent of its batch.
            self.scheduler.noise_sampler_seed = [int(s) for s in seeds]
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    @property
    def init_noise_sigma(self) -> float:
        """The scheduler's initial noise scale; flow-matching schedulers have none (their pipelines start
        from unit noise): 1."""
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def initial_latents(self, seeds: Sequence[int], height: int, width: int, frames: int | None = None, *,
                        steps: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Noise per image from its own CPU generator, times ``init_noise_sigma``: an image depends on its seed
        only (not on the device, the batch size or its neighbours). The generators are returned for the
        scheduler's noise."""
        generators = self.prepare(steps, seeds, height=height, width=width)
        latents = self.family.noise(generators, height, width, frames)
        return latents * self.init_noise_sigma, generators

    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Spatial latents (B, C, H, W) → float images (B, H, W, 3) in [0, 1] (video: (B, F, H, W, 3))."""
        return self.family.decode(latents, batch_size)

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
        eta: float = 0.0,
        samples: list[dict] | None = None,
        **loop_kw: Any,
    ) -> Generation:
        """Text to image: prompts → conditioning, seeds → noise, then :meth:`sample` (``loop_kw``: guidance,
        hooks, progress)."""
        n = len(prompts)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * n
        if isinstance(guidance_scales, (int, float)):
            guidance_scales = [float(guidance_scales)] * n
        if not (len(seeds) == len(negative_prompts) == len(guidance_scales) == n):
            raise ValueError("prompts, seeds, negative_prompts and guidance_scales must have the same length")
        height, width = height or self.family.default_size, width or self.family.default_size
        cond, uncond, negative = self.conditions(prompts, negative_prompts, loop_kw.get("guidance"))
        latents, generators = self.initial_latents(seeds, height, width, steps=steps)
        return self.sample(Request(latents, cond, uncond, list(guidance_scales), steps, generators=generators,
                                   samples=samples, eta=eta, negative=negative), **loop_kw)

    @torch.no_grad()
    def sample(self, request: Request, *, guidance: Guidance | None = None, hooks: Sequence[Any] = (),
               progress: bool = True) -> Generation:
        """A prepared request → :func:`denoise` → decoded images. Every task ends here."""
        problem = self.family.input_problem(request.latents, request.extra_channels)
        if problem:  # e.g. an inpainting model (latents + mask + masked image) under task=txt2img
            from stablefused.errors import ConfigError

            raise ConfigError(f"model={self.c.name}: {problem}")
        latents, ctx = denoise(self.family, self.scheduler, request, guidance=guidance, hooks=hooks,
                               progress=progress)
        latents = self.family.to_spatial(latents)
        return Generation(self.decode(latents), latents, ctx)
