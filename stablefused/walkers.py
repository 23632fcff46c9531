"""Walkers: the plugin kind that turns keyframes into a path through noise and text-embedding space.

A walk (``task=walk``, :mod:`stablefused.tasks.walk`) has keyframes (prompt i, seed i). The task encodes each
keyframe prompt once and draws each keyframe seed's initial noise once, exactly as text-to-image does, and
asks the walker (one per walk, ``walker=<name>``, ``plugins/walkers/<name>.py`` + ``conf/walker/<name>.yaml``):

1. :meth:`Walker.keyframes` — the keyframes (default: the ones from ``prompts``/``seeds``; ``story`` reads
   them from a file).
2. :meth:`Walker.plan` — every frame of the walk as a :class:`Frame`: which segment (keyframe ``segment`` to
   keyframe ``segment + 1``, the last wrapping to the first in a loop), the ``position`` along it (0..1), its
   time in the video and metadata for the manifest. No tensors; cheap. With ``pacing=even`` the task then
   moves the positions so that consecutive frames differ equally (it measures the picture along each
   segment through :meth:`noise`/:meth:`text`), unless the walker sets ``paces_itself`` (``audio``).
3. :meth:`noise` and :meth:`text` — for a chunk of frames, their initial latents and conditioning tensors
   (text embeddings (B, L, D), and for some model families pooled embeddings (B, D) and more: ``text`` is
   called once per tensor), from the keyframe tensors in :class:`Keys`. They must depend only on each frame
   (its segment and position) and the config, never on the other frames of the chunk, so that a walk made
   in chunks of 1 and of 8 gives the same frames, and a resumed walk the same video.
4. :meth:`prompt_weights` — the keyframes a frame mixes and their weights (written to the manifest).

Frames that need the previous frame's image (a ``zoom`` walker: each frame is the previous one zoomed and
outpainted): set ``needs_previous_image = True``. The task then makes the frames one at a time, in order,
and passes the previous frame's image (a PIL image read back from its PNG, so a resumed walk sees the same)
and a :class:`WalkContext` (the frame size, a ``paint`` callable through the one loop, ``path`` and
``add_artifact`` for files) to :meth:`condition`, whose returned dict is added to :meth:`stablefused.pipeline.Sampler.sample`'s
keyword arguments: ``latents`` (replaces the walker's noise, e.g. the zoomed image encoded and noised to
``start_step``), ``start_step``, ``extra_channels`` (an inpainting UNet's mask + masked latents), ``hooks``
(added to the recorders). Frame 0 gets ``previous=None``. A walker that makes a frame without the loop
(``zoom``: crops between keyframes it outpainted itself) returns ``images`` instead (float (B, H, W, 3) in
[0, 1]) and ``stats`` (the UNet rows/calls it spent on them, counted in the run's).

Helpers for plugins: :func:`slerp`, :func:`lerp`, :func:`ease`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

TEXT_MODES = ("lerp", "slerp")
EASINGS = ("linear", "cosine")


@dataclass
class Keyframe:
    prompt: str
    seed: int
    caption: str | None = None
    seconds: float | None = None  # story: time from this keyframe to the next


@dataclass
class Walk:
    """The walk's settings, as the task gives them to the walker."""

    keyframes: list[Keyframe]  # from prompts/seeds (keyframe i = prompt i, seed i)
    seeds: list[int]  # the seeds as given (a walker that reads its own prompts pairs them itself)
    frames: int  # frames from one keyframe to the next
    loop: bool
    fps: float
    story: str | None = None
    audio: str | None = None
    audio_start: float = 0.0
    audio_duration: float | None = None


@dataclass
class Frame:
    index: int
    segment: int  # from keyframe `segment` to keyframe `segment + 1` (mod K in a loop)
    position: float  # 0..1 along the segment; 0 is the keyframe itself
    time: float = 0.0  # seconds into the video
    meta: dict = field(default_factory=dict)  # extra manifest keys (caption, angle, ...)


@dataclass
class WalkContext:
    """What the task hands a walker that makes its own images (:meth:`Walker.condition`): the frame size, a
    ``paint`` callable that runs the one loop, and the run dir's files. Not the run, not a task's code."""

    height: int
    width: int
    latent_pixel: int  # pixels per latent pixel (the VAE's factor): a mask on this grid is exact in latents
    # paint(prompt, seed, image=None, mask=None, strength=1.0) -> (float images (1, H, W, 3) in [0, 1], UNet work
    # {"unet_rows", "model_calls"}): text-to-image without an image, else ``image`` inpainted where ``mask``
    # ("L", white = paint) is, as task=inpaint does it (not pasted back: :func:`stablefused.masks.paste_back`)
    paint: Callable[..., tuple[np.ndarray, dict]]
    path: Callable[..., Path]  # path("zoom", "keyframe_000.png"): a file under the run dir, its folder made
    add_artifact: Callable[..., None]  # add_artifact(path, kind, caption=, log_key=, **record keys): manifest + W&B
    tag: str  # the run's output settings, hashed: a file that carries it was made by this config


@dataclass
class Keys:
    """The keyframe tensors, made once per walk by the task."""

    noise: torch.Tensor  # (K, ...): each keyframe's initial latents, as text-to-image draws them
    cond: torch.Tensor  # (K, ...): one conditioning tensor per keyframe prompt (the task calls text() once per
    #                     tensor of the family's conditioning: text embeddings, pooled embeddings, ...)
    seeds: list[int]
    extra_noise: Callable[[int, int, int], torch.Tensor]  # (seed, stream, n) -> (n, C, h, w) more noise, same scale
    conditioning: Any = None  # the keyframes' whole Conditioning (stablefused.families), one row per keyframe


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two tensors (treated as flat vectors); keeps the norm where lerp shrinks
    it (to ~0.71 halfway between two independent Gaussian noises). Exact at t = 0 and 1; lerp when the two
    are (nearly) parallel."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = float(torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-30))
    if abs(dot) > dot_threshold:
        return lerp(a, b, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    out = a64 * (math.sin((1 - t) * theta) / s) + b64 * (math.sin(t * theta) / s)
    return out.reshape(a.shape).to(a.dtype)


def ease(t: float, easing: str) -> float:
    if easing == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * t) if 0 < t < 1 else float(t)
    return float(t)


def check_choice(value: Any, allowed: Sequence[str], where: str) -> None:
    from stablefused.registry import PluginError

    if value not in allowed:
        raise PluginError(f"{where}={value!r}: must be one of {', '.join(allowed)}")


class Walker:
    """Base class: keyframes → frames → per-frame noise and text embedding. The default path interpolates
    each segment's two keyframes: noise by slerp, text by ``text`` (lerp|slerp), position eased by
    ``easing`` (linear|cosine)."""

    closed = False  # True: the path always returns to its start (the walk loops whatever ``loop`` says)
    paces_itself = False  # True: the walker sets the positions (audio); pacing=even does not apply
    needs_previous_image = False  # True: frames one at a time, in order; see condition()
    makes_frames = False  # True: condition() returns the frames' images (no loop, nothing for recorders)
    min_keyframes = 2  # fewer in an open walk is a config error (a loop needs one)
    caption_size = 0.06  # captions (a frame's meta "caption") burned into the video: fraction of its height

    def __init__(self, text: str = "slerp", easing: str = "linear"):
        check_choice(text, TEXT_MODES, "walker.text")
        check_choice(easing, EASINGS, "walker.easing")
        self.text_mode, self.easing = text, easing

    # ------------------------------------------------------------------ plan (no tensors)
    def keyframes(self, walk: Walk) -> list[Keyframe]:
        return walk.keyframes

    def check_walk(self, walk: Walk, keyframes: list[Keyframe], problems: list[str]) -> None:
        """Append one line per setting this walker cannot work with (before the model loads)."""
        loop = walk.loop or self.closed
        if len(keyframes) < (1 if loop else self.min_keyframes):
            problems.append(f"prompts/seeds: {len(keyframes)} keyframe(s); walker={getattr(self, 'plugin_name', '?')} needs at least "
                            f"{self.min_keyframes} (give more prompts or seeds), or loop=true")

    def segments(self, walk: Walk, keyframes: list[Keyframe]) -> int:
        return len(keyframes) if (walk.loop or self.closed) else len(keyframes) - 1

    def segment_frames(self, walk: Walk, keyframes: list[Keyframe]) -> list[int]:
        """Frames in each segment (its first keyframe included, the next one not)."""
        return [int(walk.frames)] * self.segments(walk, keyframes)

    def plan(self, walk: Walk, keyframes: list[Keyframe]) -> list[Frame]:
        """Every frame: each segment's frames at uniform positions k / n, and in an open walk the last
        keyframe as the last frame. Keyframe s is frame sum(n[:s]) exactly; no frame is repeated where
        segments join or at a loop's seam."""
        out: list[Frame] = []
        for s, n in enumerate(self.segment_frames(walk, keyframes)):
            for k in range(n):
                out.append(Frame(len(out), s, k / n))
        if not (walk.loop or self.closed) and keyframes:
            last = max(len(keyframes) - 2, 0)
            out.append(Frame(len(out), last, 1.0) if len(keyframes) > 1 else Frame(len(out), 0, 0.0))
        for f in out:
            f.time = f.index / float(walk.fps)
        return out

    # ------------------------------------------------------------------ tensors
    def ends(self, frame: Frame, k: int) -> tuple[int, int]:
        """The keyframes at the two ends of the frame's segment."""
        return frame.segment % k, (frame.segment + 1) % k

    def seed_keyframe(self, frame: Frame, k: int) -> int:
        """The keyframe whose seed's generator the scheduler uses for this frame (stochastic schedulers):
        the segment's start, or its end for a frame at the end (the last frame of an open walk)."""
        a, b = self.ends(frame, k)
        return b if frame.position >= 1 else a

    def noise(self, frames: Sequence[Frame], keys: Keys) -> torch.Tensor:
        k = len(keys.noise)
        return torch.stack([slerp(keys.noise[a], keys.noise[b], f.position)
                            for f in frames for a, b in [self.ends(f, k)]])

    def text(self, frames: Sequence[Frame], keys: Keys) -> torch.Tensor:
        k, mix = len(keys.cond), slerp if self.text_mode == "slerp" else lerp
        return torch.stack([mix(keys.cond[a], keys.cond[b], ease(f.position, self.easing))
                            for f in frames for a, b in [self.ends(f, k)]])

    def prompt_weights(self, frame: Frame, k: int) -> tuple[list[int], list[float]]:
        """The keyframes whose prompts this frame mixes, and their weights (for the manifest)."""
        a, b = self.ends(frame, k)
        w = ease(frame.position, self.easing)
        if a == b or w == 0:
            return [a], [1.0]
        if w == 1:
            return [b], [1.0]
        return [a, b], [round(1 - w, 6), round(w, 6)]

    def condition(self, frames: Sequence[Frame], previous: Any | None, keys: Keys, ctx: WalkContext) -> dict:
        """Extra keyword arguments for ``Sampler.sample`` (walkers with ``needs_previous_image``); ``ctx``:
        what the task lends (size, ``paint``, files)."""
        return {}

    # ------------------------------------------------------------------ video
    def soundtrack(self, walk: Walk) -> tuple[str, float, float | None] | None:
        """(audio file, start s, duration s or None) to mux into the video, or None."""
        return None


def default_keyframes(prompts: Sequence[str], seeds: Sequence[int]) -> list[Keyframe]:
    """Keyframe i = (prompt i, seed i); one prompt for all seeds, or one seed for all prompts."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    n = max(len(prompts), len(seeds))
    if len(prompts) == 1:
        prompts = prompts * n
    if len(seeds) == 1:
        seeds = seeds * n
    if len(prompts) != len(seeds):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts; a walk zips them (keyframe i = "
                         "prompt i, seed i): give one seed per prompt, or one seed (or one prompt) for all")
    return [Keyframe(p, s) for p, s in zip(prompts, seeds)]


def derived_seed(seed: int, stream: int) -> int:
    """A seed for an extra noise stream of ``seed`` (independent of it and of other streams)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream)]).generate_state(1, np.uint64)[0] >> 1)
