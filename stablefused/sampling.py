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
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from stablefused.attention_maps import self_attention_map
from stablefused.errors import NonFiniteError
from stablefused.families import Conditioning
from stablefused.guidance import COND, DEPENDENT, MODEL2, NEGATIVE, UNCOND, Guidance
from stablefused.hooks import LoopContext, StepInfo, StepState, x0_coefficients
from stablefused.perturbations import perturbed_rows


def _step_kwargs(scheduler: Any, generators: Any, eta: float) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def _final_sigma(scheduler: Any, n: int) -> float:
    """σ after the last iteration (EDM convention): the scheduler's own last sigma (0 for Euler-type), else
    from DDIM's ``final_alpha_cumprod``, else 0."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > n:
        s = float(sigmas[n])
        return s / (1 - s) if getattr(scheduler.config, "use_flow_sigmas", False) or "Flow" in type(scheduler).__name__ else s
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is not None:
        a = max(float(final), 1e-20)
        return math.sqrt((1 - a) / a)
    return 0.0


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
    rows: torch.Tensor  # rows of the main network's batch: each main-network prediction's rows, in ORDER
    embeds: torch.Tensor  # the matching rows of cat([uncond, cond, negative]) conditioning
    take: dict  # prediction name -> per sample: the output row holding it (or the stand-in, see Guider)
    perturbed: dict  # perturbed prediction name -> its rows' positions in the batch
    model2: torch.Tensor | None  # samples needing the second model (None: none)
    dependent: dict  # dependent prediction name -> samples needing it (the rows of one extra call, in order)


ORDER = (UNCOND, COND, NEGATIVE)  # the main batch: [uncond rows, cond rows, negative rows, perturbed rows...]


class _BatchPlans:
    """Index tensors for a pattern of needed predictions, built once per pattern and kept on the device."""

    def __init__(self, device: torch.device):
        self.device, self.cache = device, {}

    def get(self, needs: dict[str, torch.Tensor]) -> _Plan | None:
        """The plan for ``needs`` (predictions no row needs are left out: a guider outside its window costs
        what CFG costs), or None for exactly diffusers' ``[uncond, cond]`` batch."""
        needs = {k: v for k, v in needs.items() if k in (COND, UNCOND) or bool(v.any())}
        if set(needs) == {COND, UNCOND} and bool(needs[COND].all()) and bool(needs[UNCOND].all()):
            return None  # the common case: exactly diffusers' torch.cat([latents] * 2)
        key = tuple((k, tuple(v.tolist())) for k, v in needs.items())
        if key not in self.cache:
            self.cache[key] = self._build(needs)
        return self.cache[key]

    def _build(self, needs: dict[str, torch.Tensor]) -> _Plan:
        batch = len(needs[COND])
        names = [n for n in ORDER if n in needs] + sorted(n for n in needs if n.startswith("perturbed:"))
        source = {UNCOND: 0, COND: batch, NEGATIVE: 2 * batch}  # blocks of the stacked conditioning
        rows, embeds, position, start = [], [], {}, 0
        for name in names:
            idx = needs[name].nonzero().flatten()
            rows.append(idx)
            embeds.append(source.get(name, batch) + idx)
            pos = torch.full((batch,), -1, dtype=torch.long)
            pos[idx] = start + torch.arange(len(idx))
            position[name], start = pos, start + len(idx)
        has = {n: p >= 0 for n, p in position.items()}
        cond = torch.where(has[COND], position[COND], position[UNCOND])
        take = {COND: cond, UNCOND: torch.where(has[UNCOND], position[UNCOND], cond)}
        for name in names[2:]:
            take[name] = torch.where(has[name], position[name], cond)
        perturbed = {n: position[n][has[n]] for n in names if n.startswith("perturbed:")}
        model2 = needs[MODEL2].nonzero().flatten() if MODEL2 in needs and bool(needs[MODEL2].any()) else None
        dependent = {n: needs[n].nonzero().flatten() for n in sorted(needs) if n.startswith(DEPENDENT)}
        move = lambda x: None if x is None else x.to(self.device)  # noqa: E731
        return _Plan(move(torch.cat(rows)), move(torch.cat(embeds)), {n: move(v) for n, v in take.items()},
                     {n: move(v) for n, v in perturbed.items()}, move(model2),
                     {n: move(v) for n, v in dependent.items()})


@dataclass
class Prediction:
    """One guided model evaluation: the guided prediction and what went into it."""

    guided: torch.Tensor
    cond: torch.Tensor  # rows whose conditional pass was skipped hold the unconditional prediction
    uncond: torch.Tensor  # and vice versa
    scale: torch.Tensor  # (B,) guidance scale at this iteration
    has_cond: torch.Tensor  # (B,) bool
    has_uncond: torch.Tensor  # (B,) bool
    rows: int  # rows the network(s) evaluated
    calls: int = 1  # network calls made
    predictions: dict | None = None  # every prediction the guider combined, by name (see stablefused.guidance)
    needs: dict | None = None  # prediction name -> (B,) bool: rows where it was really evaluated


class GuidedDenoiser:
    """The network under guidance, as one callable: ``(model_input, t, info) → Prediction``.

    It holds what is fixed for a batch (the family, conditioning, extra input channels, per-sample base scales,
    the guidance hook) and does the bookkeeping of needed predictions: the main network's batch is
    ``[rows needing uncond, rows needing cond, rows needing the negative prompt, rows of each perturbation]``
    (diffusers' ``torch.cat([latents] * 2)`` when every row needs exactly cond and uncond, and
    ``StableDiffusionPAGPipeline``'s ``[uncond, cond, perturbed]`` for PAG), perturbations applied to their rows
    inside that one call; a second model (autoguidance) makes a second call, and so do dependent predictions
    (SAG: inputs the guider builds from the main call's predictions and attention map), all of them in one.
    Predictions a row did not need are filled with stand-ins (see :mod:`stablefused.guidance`), so guiders
    always see full tensors."""

    def __init__(self, family: Any, cond: Conditioning, uncond: Conditioning, base_scales: torch.Tensor,
                 guidance: Guidance, extra_channels: torch.Tensor | None = None, negative: Conditioning | None = None):
        self.family, self.guidance, self.base_scales, self.extra = family, guidance, base_scales, extra_channels
        self.cond, self.uncond, self.negative = cond, uncond, negative
        self.conds = Conditioning.cat([uncond, cond] + ([negative] if negative is not None else []))
        device = cond.embeds.device
        self.plans, self.scales = _BatchPlans(device), _DeviceCache(device)
        guidance.bind(family)

    def _net(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, network: Any = None) -> torch.Tensor:
        """One network call (the family's, or ``network``'s), in inference mode: no autograd bookkeeping at all
        (no_grad still counts versions of every activation); what comes out is only ever read."""
        with torch.inference_mode():
            return (network or self.family)(x, t, cond)

    def _with_extra(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """``x`` with the extra input channels of its rows (``rows``; None: x is the batch, once or repeated)."""
        if self.extra is None:
            return x
        if rows is None:
            extra = torch.cat([self.extra] * (len(x) // len(self.extra)))
        else:
            extra = self.extra.index_select(0, rows)
        return torch.cat([x, extra], dim=1)

    def __call__(self, model_input: torch.Tensor, t: torch.Tensor, info: StepInfo) -> Prediction:
        batch = model_input.shape[0]
        w = torch.as_tensor(self.guidance.scale(self.base_scales, info), dtype=torch.float32).reshape(batch)
        needs = self.guidance.needs(w, info)
        if not bool((needs[COND] | needs[UNCOND]).all()):
            raise ValueError("guidance rule asked for neither the conditional nor the unconditional pass")
        if NEGATIVE in needs and self.negative is None and bool(needs[NEGATIVE].any()):
            raise ValueError("this guider needs negative-prompt predictions; the request has no negative conditioning")
        plan = self.plans.get(needs)
        if plan is None and self.family.cfg_in_one_call:  # every row needs both passes; exactly diffusers' batch
            x_in = self._with_extra(torch.cat([model_input, model_input]), None)
            uncond, cond = self._net(x_in, t, self.conds).chunk(2)
            preds, rows, calls = {UNCOND: uncond, COND: cond}, x_in.shape[0], 1
        elif plan is None:  # the same, one call per prediction as the family's pipeline does (Flux)
            x_in = self._with_extra(model_input, None)
            cond, uncond = self._net(x_in, t, self.cond), self._net(x_in, t, self.uncond)
            preds, rows, calls = {UNCOND: uncond, COND: cond}, 2 * batch, 2
        else:
            x_in = self._with_extra(model_input.index_select(0, plan.rows), plan.rows)
            active = [(self.guidance.perturbations[n.split(":", 1)[1]], idx) for n, idx in plan.perturbed.items()]
            layer = self.guidance.attention_layer if plan.dependent else None
            with perturbed_rows(self.family.network, self.family.name, active), \
                    self_attention_map(self.family.network, layer) as seen:
                out = self._net(x_in, t, self.conds.select(plan.embeds))
            preds = {name: out.index_select(0, take) for name, take in plan.take.items()}
            rows, calls = x_in.shape[0], 1
            if plan.model2 is not None:  # autoguidance: the second model on its rows, under the prompt
                x2 = self._with_extra(model_input.index_select(0, plan.model2), plan.model2)
                weak = self._net(x2, t, self.cond.select(plan.model2), self.guidance.model2)
                preds[MODEL2] = preds[COND].index_copy(0, plan.model2, weak.to(preds[COND].dtype))
                rows, calls = rows + x2.shape[0], 2
            if plan.dependent:  # SAG: inputs built from the predictions above, one more call
                maps = {n: seen["map"].index_select(0, take) for n, take in plan.take.items()} if layer else {}
                rows, calls = rows + self._dependent(plan, preds, maps, t, self.scales.get(w), info), calls + 1
        for name in needs:  # needed by no row at this step: the stand-in (see stablefused.guidance)
            preds.setdefault(name, preds[COND])
        guided = self.guidance.combine(preds, self.scales.get(w), info)
        return Prediction(guided, preds[COND], preds[UNCOND], w, needs[COND], needs[UNCOND], rows, calls, preds, needs)

    def _dependent(self, plan: _Plan, preds: dict, maps: dict, t: torch.Tensor, w: torch.Tensor, info: StepInfo) -> int:
        """Every dependent prediction's rows in one network call, each row under the conditioning the guider
        chose (prompt or unconditional); fills ``preds`` (stand-in: cond) and returns the rows evaluated."""
        batch, xs, embeds = len(w), [], []
        for name, idx in plan.dependent.items():
            x, on_cond = self.guidance.dependent_input(name, preds, maps, w, info)
            xs.append(x.index_select(0, idx))
            embeds.append(idx + batch * on_cond.to(idx.device, torch.long).index_select(0, idx))
        rows = torch.cat(list(plan.dependent.values()))
        x_in = self._with_extra(torch.cat(xs), rows)
        out = self._net(x_in, t, self.conds.select(torch.cat(embeds))).to(preds[COND].dtype)
        for (name, idx), part in zip(plan.dependent.items(), out.split([len(i) for i in plan.dependent.values()])):
            preds[name] = preds[COND].index_copy(0, idx, part)
        return x_in.shape[0]


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
    UNets: mask + masked latents). ``negative``: the negative prompt's conditioning for a guider with
    ``uses_negative`` (``uncond`` is then the empty prompt). ``generators``: one CPU generator per sample, for stochastic schedulers.

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
    negative: Conditioning | None = None  # negative-prompt rows for guiders that read them apart (perp-neg)


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
    # σ after the last iteration: where the run stops (a base model handing over), else the schedule's end
    final_sigma = all_sigmas[end] if end is not None and end < len(all_sigmas) else _final_sigma(scheduler, len(all_sigmas))
    prediction_type = family.prediction_type
    step_kwargs = _step_kwargs(scheduler, request.generators, request.eta)
    scale_input = getattr(scheduler, "scale_model_input", None) or (lambda x, t: x)  # flow matching: none

    guidance.reset()  # per-run guidance state (e.g. APG momentum) starts fresh for every batch
    model = GuidedDenoiser(family, request.cond, request.uncond, base_scales, guidance, request.extra_channels,
                           request.negative)
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
        info = StepInfo(i, len(timesteps), t, sigmas[i], all_sigmas[0], all_sigmas[-1], model_input, prediction_type,
                        sigmas[i + 1] if i + 1 < len(sigmas) else final_sigma)
        pred = model(model_input, t, info)
        ctx.stats["unet_rows"] += pred.rows
        ctx.stats["model_calls"] += pred.calls
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
                sigma_next=info.sigma_next, predictions={k: spatial(v) for k, v in pred.predictions.items()},
                needs=pred.needs,
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
