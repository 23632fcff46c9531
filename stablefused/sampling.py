"""The one sampling loop. Every task (text-to-image, image-to-image, inpainting, video, walks) on every model
family calls :func:`denoise` with a :class:`Request`; tasks differ only in the latents, conditioning and extra
inputs they put in it, families (:mod:`stablefused.families`) only in how the network is called.

The loop follows diffusers' ``StableDiffusionPipeline.__call__`` step for step (same UNet batch order
``[uncond, cond]``, same scheduler calls), so with all passes needed its output equals the pipeline's. What
it adds: a guidance scale per sample (a whole guidance sweep in one batch), half-batch skipping where the
rule allows it, x̂0 for every scheduler, and the hook calls described in :mod:`stablefused.hooks`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from stablefused.errors import NonFiniteError
from stablefused.families import Conditioning
from stablefused.guidance import Guidance
from stablefused.hooks import LoopContext, StepInfo, StepState, x0_coefficients


def _step_kwargs(scheduler: Any, generators: Any, eta: float) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def predict_x0(model_output: torch.Tensor, model_input: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """x̂0 from a prediction. ``model_input`` is what the UNet saw (the scheduler's scaled input), which for
    every scheduler is sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε with ᾱ = 1 / (1 + σ²)."""
    a, b = x0_coefficients(sigma, prediction_type)
    return a * model_input - b * model_output


class _DeviceCache:
    """A small CPU tensor's copy on the device, reused while its values repeat: a host-to-device copy of
    pageable memory synchronises the stream, which would stall the GPU's queue at every step."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.value = device, None, None

    def get(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.tolist())
        if key != self.key:
            self.key, self.value = key, x.to(self.device)
        return self.value


@dataclass
class _Plan:
    rows: torch.Tensor  # rows of the batch fed to the UNet: [uncond rows, cond rows]
    embeds: torch.Tensor  # the matching rows of cat([uncond, cond]) conditioning
    uncond: torch.Tensor  # per sample: UNet output row holding its uncond prediction (else its cond one)
    cond: torch.Tensor  # per sample: UNet output row holding its cond prediction (else its uncond one)


class _BatchPlans:
    """Index tensors for a half-batch pattern, built once per pattern and kept on the device."""

    def __init__(self, device: torch.device):
        self.device, self.cache = device, {}

    def get(self, need_uncond: torch.Tensor, need_cond: torch.Tensor) -> _Plan | None:
        if bool(need_uncond.all()) and bool(need_cond.all()):
            return None
        key = (tuple(need_uncond.tolist()), tuple(need_cond.tolist()))
        if key not in self.cache:
            batch = len(need_uncond)
            u, c = need_uncond.nonzero().flatten(), need_cond.nonzero().flatten()
            pos_u = torch.full((batch,), -1, dtype=torch.long)
            pos_c = torch.full((batch,), -1, dtype=torch.long)
            pos_u[u] = torch.arange(len(u))
            pos_c[c] = len(u) + torch.arange(len(c))
            plan = _Plan(rows=torch.cat([u, c]), embeds=torch.cat([u, batch + c]),
                         uncond=torch.where(need_uncond, pos_u, pos_c), cond=torch.where(need_cond, pos_c, pos_u))
            self.cache[key] = _Plan(*(x.to(self.device) for x in (plan.rows, plan.embeds, plan.uncond, plan.cond)))
        return self.cache[key]


@dataclass
class Prediction:
    """One guided model evaluation: the guided prediction and what went into it."""

    guided: torch.Tensor
    cond: torch.Tensor  # rows whose conditional pass was skipped hold the unconditional prediction
    uncond: torch.Tensor  # and vice versa
    scale: torch.Tensor  # (B,) guidance scale at this iteration
    has_cond: torch.Tensor  # (B,) bool
    has_uncond: torch.Tensor  # (B,) bool
    rows: int  # rows the UNet evaluated


class GuidedDenoiser:
    """The network under classifier-free guidance, as one callable: ``(model_input, t, info) → Prediction``.

    It holds what is fixed for a batch (the family, conditioning, extra input channels, per-sample base scales,
    the guidance hook) and does the half-batch bookkeeping: the network batch is ``[rows needing uncond, rows
    needing cond]`` (diffusers' ``torch.cat([latents] * 2)`` when every row needs both), and a skipped pass is
    filled with the prediction the row has, so guidance rules always see full tensors."""

    def __init__(self, family: Any, cond: Conditioning, uncond: Conditioning, base_scales: torch.Tensor,
                 guidance: Guidance, extra_channels: torch.Tensor | None = None):
        self.family, self.guidance, self.base_scales, self.extra = family, guidance, base_scales, extra_channels
        self.conds = Conditioning.cat([uncond, cond])
        device = cond.embeds.device
        self.plans, self.scales = _BatchPlans(device), _DeviceCache(device)

    def __call__(self, model_input: torch.Tensor, t: torch.Tensor, info: StepInfo) -> Prediction:
        batch = model_input.shape[0]
        w = torch.as_tensor(self.guidance.scale(self.base_scales, info), dtype=torch.float32).reshape(batch)
        need_cond, need_uncond = self.guidance.rule.passes(w)
        if not bool((need_cond | need_uncond).all()):
            raise ValueError("guidance rule asked for neither the conditional nor the unconditional pass")
        plan = self.plans.get(need_uncond, need_cond)
        if plan is None:  # the common case: every row needs both passes; exactly diffusers' batch
            x_in, cond = torch.cat([model_input, model_input]), self.conds
            extra = None if self.extra is None else torch.cat([self.extra, self.extra])
        else:
            x_in, cond = model_input.index_select(0, plan.rows), self.conds.select(plan.embeds)
            extra = None if self.extra is None else self.extra.index_select(0, plan.rows)
        if extra is not None:
            x_in = torch.cat([x_in, extra], dim=1)
        out = self.family(x_in, t, cond)
        if plan is None:
            uncond, cond = out.chunk(2)
        else:
            uncond, cond = out.index_select(0, plan.uncond), out.index_select(0, plan.cond)
        guided = self.guidance.rule(cond, uncond, self.scales.get(w), info)
        return Prediction(guided, cond, uncond, w, need_cond, need_uncond, x_in.shape[0])


class _FiniteCheck:
    """Cheap NaN/inf watch on the latents: each step ANDs ``isfinite(x).all()`` into a flag kept on the device
    (no sync); the flag is read (one sync) every ``every`` steps and at the end. On the first bad read it
    stops the run with one line naming the step window and the usual cause."""

    def __init__(self, device: torch.device, every: int = 10, dtype: torch.dtype | None = None):
        self.ok, self.every, self.dtype, self.checked = torch.ones((), dtype=torch.bool, device=device), every, dtype, 0

    def update(self, x: torch.Tensor, step: int, total: int, last: bool = False) -> None:
        self.ok &= torch.isfinite(x).all()
        if last or (step + 1) % self.every == 0:
            if not bool(self.ok):
                first = self.checked + 1
                where = f"step {step + 1}" if first == step + 1 else f"between steps {first} and {step + 1}"
                hint = ("float16 overflow in the UNet; try dtype=float32 or bfloat16" if self.dtype == torch.float16
                        else "a guidance scale or schedule/rule parameter too large, or a broken model")
                raise NonFiniteError(f"denoise: the latents became NaN/inf {where} of {total}: likely {hint}")
            self.checked = step + 1


@dataclass
class Request:
    """One batch for the loop, as a task fills it (the way diffusers' ``prepare_latents`` prepares inputs).

    ``latents``: initial latents in the scheduler's layout, already multiplied by ``init_noise_sigma``
    (text-to-image) or noised to ``start_step`` (image-to-image). ``cond``/``uncond``: one row per sample.
    ``scales``: guidance scale per sample, any real value. ``start_step``: skip the first ``start_step`` steps
    of a ``steps`` schedule. ``extra_channels``: (B, C', ...) concatenated to the network input (inpainting
    UNets: mask + masked latents). ``generators``: one CPU generator per sample, for stochastic schedulers.

    The scheduler must already be set to ``steps`` (and ``start_step``) by :meth:`Sampler.prepare`, the one
    owner of scheduler state; :func:`denoise` only reads it."""

    latents: torch.Tensor
    cond: Conditioning
    uncond: Conditioning
    scales: torch.Tensor | Sequence[float]
    steps: int
    start_step: int = 0
    extra_channels: torch.Tensor | None = None
    generators: list[torch.Generator] | None = None
    samples: list[dict] | None = None
    eta: float = 0.0
    end_step: int | None = None  # stop before this step of the schedule (SDXL's denoising_end: a refiner goes on)


def denoise(
    family: Any,
    scheduler: Any,
    request: Request,
    *,
    guidance: Guidance | None = None,
    hooks: Sequence[Any] = (),
    progress: bool = True,
) -> tuple[torch.Tensor, LoopContext]:
    """Run the denoising loop on ``request`` and return the final latents (and the run's context with its
    stats). ``family``: the model's :class:`~stablefused.families.Family` (calls the network)."""
    guidance = guidance or Guidance.default()
    latents = request.latents
    batch = latents.shape[0]
    base_scales = torch.as_tensor(request.scales, dtype=torch.float32).reshape(-1).cpu()
    if base_scales.numel() != batch:
        raise ValueError(f"got {base_scales.numel()} guidance scales for a batch of {batch}")
    if getattr(scheduler, "num_inference_steps", None) != request.steps:
        raise ValueError(f"the scheduler is set to {getattr(scheduler, 'num_inference_steps', None)} steps, the "
                         f"request asks for {request.steps}: call Sampler.prepare first")
    begin = request.start_step * scheduler.order
    end = None if request.end_step is None else request.end_step * scheduler.order
    timesteps = scheduler.timesteps[begin:end]
    all_sigmas = family.sigmas(scheduler)
    sigmas = all_sigmas[begin:end]
    prediction_type = family.prediction_type
    step_kwargs = _step_kwargs(scheduler, request.generators, request.eta)
    scale_input = getattr(scheduler, "scale_model_input", None) or (lambda x, t: x)  # flow matching: none

    guidance.reset()  # per-run guidance state (e.g. APG momentum) starts fresh for every batch
    model = GuidedDenoiser(family, request.cond, request.uncond, base_scales, guidance, request.extra_channels)
    ctx = LoopContext(
        latents=latents, cond=request.cond, uncond=request.uncond, base_scales=base_scales,
        timesteps=timesteps, scheduler=scheduler, family=family, samples=request.samples or [],
        stats={"unet_rows": 0, "model_calls": 0},
    )
    for hook in hooks:
        new = hook.before_loop(ctx)
        if new is not None:
            latents = new

    spatial, packed = family.to_spatial, family.from_spatial
    finite = _FiniteCheck(latents.device, dtype=latents.dtype)
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoise", leave=False)):
        # scale -> predict (guided) -> step -> hooks
        model_input = scale_input(latents, t)
        info = StepInfo(i, len(timesteps), t, sigmas[i], all_sigmas[0], all_sigmas[-1], model_input, prediction_type)
        pred = model(model_input, t, info)
        ctx.stats["unet_rows"] += pred.rows
        ctx.stats["model_calls"] += 1
        step_out = scheduler.step(pred.guided, t, latents, **step_kwargs, return_dict=True)
        x_prev = step_out.prev_sample
        if hooks:  # hooks see the spatial layout (B, C, H, W), whatever the family's scheduler layout
            x0 = getattr(step_out, "pred_original_sample", None)
            if x0 is None:
                x0 = predict_x0(pred.guided, model_input, sigmas[i], prediction_type)
            state = StepState(
                index=i, num_steps=len(timesteps), t=t, sigma=sigmas[i], sigma_max=all_sigmas[0],
                sigma_min=all_sigmas[-1], model_input=spatial(model_input), prediction_type=prediction_type,
                x_t=spatial(latents), eps_cond=spatial(pred.cond), eps_uncond=spatial(pred.uncond),
                eps_guided=spatial(pred.guided), x0_pred=spatial(x0), x_prev=spatial(x_prev),
                guidance_scale=pred.scale, has_cond=pred.has_cond, has_uncond=pred.has_uncond, unet_rows=pred.rows,
            )
            for hook in hooks:
                new = hook.on_step(state)
                if new is not None:
                    state.x_prev = new
                    x_prev = packed(new)
        latents = x_prev
        finite.update(latents, i, len(timesteps), last=i == len(timesteps) - 1)

    for hook in hooks:
        hook.after_loop(ctx, spatial(latents))
    return latents, ctx
