"""The hook interface: how plugins attach to the sampling loop.

The loop (:func:`stablefused.sampling.denoise`) calls, in order:

* ``hook.before_loop(ctx: LoopContext)`` once. Return ``None`` or a tensor that replaces the initial latents.
* For each loop iteration (= each UNet evaluation; a 2nd-order scheduler such as Heun makes two per step):
  the **guidance hook** (:class:`stablefused.guidance.Guidance`) gives the per-sample scale
  ``w = schedule(base_scale, info)`` and the guider says which predictions each row needs
  (``guider.needs(w, info)``: cond, uncond, negative, perturbed:<name>, model2); after the network call(s)
  it combines them (``guider.combine(predictions, w, info)``).
  Then the scheduler steps, and every ``hook.on_step(state: StepState)`` runs. Return ``None`` or a tensor
  that replaces ``x_{t-1}`` (for example latent blending for inpainting).
* ``hook.after_loop(ctx, latents)`` once, with the final latents (return value ignored).

Hooks see tensors as they are; they must not modify them in place. Anything a hook wants to keep it copies
(``.detach().to("cpu")``). A hook may hold state across the batches of one StableFused run; the app creates
fresh plugin instances for every run, so nothing leaks between the jobs of a sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class StepInfo:
    """Where the loop is: what a guidance schedule needs to decide a scale."""

    index: int  # loop iteration, 0-based (UNet evaluations; Heun/KDPM2 make two per step)
    num_steps: int  # loop iterations in this run
    t: torch.Tensor  # the scheduler's timestep for this iteration
    sigma: float  # noise level in the x = x0 + sigma * eps convention: sqrt((1 - alpha_bar) / alpha_bar)
    sigma_max: float  # sigma of the first iteration of a full schedule (for interval guidance)
    sigma_min: float  # sigma of the last iteration of a full schedule

    model_input: torch.Tensor | None = None  # what the UNet saw: the scheduler-scaled x_t
    prediction_type: str = "epsilon"  # the model's parameterisation: epsilon, v_prediction, sample or flow
    sigma_next: float | None = None  # sigma after this iteration's scheduler step (0 at the end of Euler)

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        """x̂0 from a prediction (ε, v or x0) at this step."""
        a, b = x0_coefficients(self.sigma, self.prediction_type)
        return a * self.model_input - b * pred

    def from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The prediction (in the model's parameterisation) that gives ``x0`` at this step."""
        a, b = x0_coefficients(self.sigma, self.prediction_type)
        return (a * self.model_input - x0) / b

    @property
    def progress(self) -> float:
        """Fraction of the loop already done before this iteration: 0 at the first, (n-1)/n at the last."""
        return self.index / self.num_steps


def x0_coefficients(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(A, B) with x̂0 = A·x_in − B·prediction, where x_in = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε is the UNet's input and
    ᾱ = 1 / (1 + σ²). ε-prediction: (1/√ᾱ, √(1−ᾱ)/√ᾱ); v-prediction: (√ᾱ, √(1−ᾱ)); sample: (0, −1).
    Flow matching (SD3, Flux): x_in = (1−s)·x0 + s·ε with s = σ/(1+σ), the network predicts v = ε − x0,
    so x̂0 = x_in − s·v: (1, s)."""
    if prediction_type == "flow":
        return 1.0, (1.0 if math.isinf(sigma) else sigma / (1.0 + sigma))
    alpha_bar = 1.0 / (1.0 + sigma * sigma)
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return 1.0 / a, s / a
    if prediction_type == "v_prediction":
        return a, s
    if prediction_type == "sample":
        return 0.0, -1.0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass
class StepState(StepInfo):
    """Everything known after one loop iteration. Predictions are in the model's parameterisation
    (epsilon, or v for v-prediction models). Rows whose pass was skipped (scale 0 needs no conditional
    pass, scale 1 no unconditional) hold the other prediction; ``has_cond``/``has_uncond`` say which."""

    x_t: torch.Tensor = None  # latents entering the iteration (scheduler space)
    eps_cond: torch.Tensor = None
    eps_uncond: torch.Tensor = None
    eps_guided: torch.Tensor = None
    x0_pred: torch.Tensor = None  # predicted clean latents, x̂0
    x_prev: torch.Tensor = None  # latents after the scheduler step, x_{t-1}
    guidance_scale: torch.Tensor = None  # (B,) scale used at this iteration
    has_cond: torch.Tensor = None  # (B,) bool
    has_uncond: torch.Tensor = None  # (B,) bool
    unet_rows: int = 0  # rows evaluated by the network(s) in this iteration
    predictions: dict | None = None  # every prediction the guider combined, by name (cond, uncond, perturbed:...)
    needs: dict | None = None  # prediction name -> (B,) bool: rows where it was really evaluated


@dataclass
class LoopContext:
    """What a run is: given to ``before_loop`` and ``after_loop``."""

    latents: torch.Tensor  # initial latents (already scaled by the scheduler's init_noise_sigma)
    cond: Any  # stablefused.families.Conditioning, one row per sample
    uncond: Any
    base_scales: torch.Tensor  # (B,) guidance scale per sample before any schedule
    timesteps: torch.Tensor
    scheduler: Any
    family: Any  # stablefused.families.Family: the model family (its network, encoders, latent layout)
    samples: list[dict] = field(default_factory=list)  # per-sample metadata (prompt, seed, ...)
    stats: dict = field(default_factory=dict)  # filled by the loop: unet_rows, model_calls

    @property
    def network(self) -> Any:
        """The denoising network (UNet or transformer)."""
        return self.family.network

    @property
    def cond_embeds(self) -> torch.Tensor:
        """The conditional text sequence (B, L, D)."""
        return self.cond.embeds


class Hook(Protocol):
    def before_loop(self, ctx: LoopContext) -> torch.Tensor | None: ...

    def on_step(self, state: StepState) -> torch.Tensor | None: ...

    def after_loop(self, ctx: LoopContext, latents: torch.Tensor) -> None: ...


class BaseHook:
    """Convenience base: every method does nothing. Override what you need."""

    def before_loop(self, ctx: LoopContext) -> torch.Tensor | None:
        return None

    def on_step(self, state: StepState) -> torch.Tensor | None:
        return None

    def after_loop(self, ctx: LoopContext, latents: torch.Tensor) -> None:
        return None
