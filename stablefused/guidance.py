"""The guidance hook: a schedule (the scale at each step) and a guider (which predictions a step needs and how
they combine).

A **schedule** (plugin kind ``guidance_schedule``) maps each sample's base scale to this iteration's scale::

    class Schedule:
        def __call__(self, base: Tensor, info: StepInfo) -> Tensor   # (B,) -> (B,)

A **guider** (plugin kind ``guidance_rule``; the successor of the two-prediction guidance rules, which are
guiders of two conditions) says, per step and per sample, which predictions it needs and combines them::

    class Guider:
        def needs(self, w, info) -> dict[str, Tensor]   # prediction name -> (B,) bool: rows that need it
        def combine(self, p: dict[str, Tensor], w, info) -> Tensor   # the guided prediction
        def reset(self) -> None                          # forget per-run state (momentum, ...)

Prediction names (:data:`COND`, :data:`UNCOND`, :data:`NEGATIVE`, ``perturbed:<name>``, :data:`MODEL2`):

* ``cond``: the network under the prompt; ``uncond``: under the negative prompt ("" unless one is set, or
  always "" for a guider that reads the negative prompt itself, ``uses_negative = True``);
* ``negative``: under the negative prompt (perp-neg);
* ``perturbed:<name>``: under the prompt, through the network with the perturbation the guider holds in
  ``perturbations[<name>]`` (:mod:`stablefused.perturbations`) applied to those rows inside the same batch;
* ``model2``: under the prompt, through a second (weaker) model (autoguidance), one extra network call;
* ``dependent:<name>``: a prediction whose input depends on this step's other predictions (SAG's blurred
  x̂0, re-noised): after the main call the loop asks ``guider.dependent_input(name, p, maps, w, info)`` for
  every row's network input and conditioning (prompt or unconditional), and evaluates the rows that need it
  in one extra network call. A guider with ``attention_layer`` (a module-name pattern, see
  :mod:`stablefused.attention_maps`) gets in ``maps`` that self-attention layer's map from the main call,
  by prediction name like ``p``.

``needs`` lets the loop evaluate only what a row needs at this step, in as few network calls as possible
(one for everything on the main network). A guider that does not need a prediction for a row promises that
its output does not depend on it; the loop fills a missing ``cond``/``uncond`` with the other one and any
other missing prediction with ``cond``, so ``combine`` always sees full tensors.

A two-prediction guider may instead implement the rule interface, ``passes(w) -> (need_cond, need_uncond)``
and ``__call__(cond, uncond, w, info)``; the base class maps it onto ``needs``/``combine``.
"""

from __future__ import annotations

from typing import Any

import torch

from stablefused import registry
from stablefused.hooks import StepInfo

COND, UNCOND, NEGATIVE, MODEL2 = "cond", "uncond", "negative", "model2"
DEPENDENT = "dependent:"


def perturbed(name: str) -> str:
    """The prediction name of the conditional prediction under perturbation ``name``."""
    return f"perturbed:{name}"


def dependent(name: str) -> str:
    """The prediction name of the guider's dependent prediction ``name`` (a second, sequential call)."""
    return f"{DEPENDENT}{name}"


def per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (B,) scale to broadcast against a (B, ...) prediction."""
    return w.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def strength(base: torch.Tensor, f: float) -> torch.Tensor:
    """A schedule's scale from its strength factor f: w = 1 + (b - 1) f for base scale b. Exactly b at
    f = 1 and exactly 1 (conditional only, so the unconditional pass is skipped) at f = 0."""
    return base if f == 1 else 1 + (base - 1) * f


def ramp(info: StepInfo) -> float:
    """0 at the first loop iteration, 1 at the last (0 when there is only one)."""
    return info.index / max(1, info.num_steps - 1)


def in_window(info: StepInfo, start: float | None, stop: float | None, strict_start: bool = False) -> bool:
    """Whether this iteration is in the window [start, stop) of the run (fractions), counted as diffusers'
    guiders count it: ``int(start·n) <= i < int(stop·n)`` (``<`` at the start with ``strict_start``, as
    diffusers' perturbed-guidance windows). ``None`` for both: every iteration."""
    if start is None and stop is None:
        return True
    n, i = info.num_steps, info.index
    lo, hi = int((start or 0.0) * n), int((1.0 if stop is None else stop) * n)
    return (lo < i if strict_start else lo <= i) and i < hi


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of ``v`` against ``onto``, per sample over all non-batch dimensions, in
    float64 (APG's and FDG's projection)."""
    dims = list(range(1, v.ndim))
    v64, unit = v.double(), torch.nn.functional.normalize(onto.double(), dim=dims)
    par = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return par.to(v.dtype), (v64 - par).to(v.dtype)


def rescale(pred: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 §3.4: ``pred`` rescaled to the std of ``cond``, mixed by ``phi`` (0: unchanged)."""
    if phi <= 0:
        return pred
    dims = list(range(1, pred.ndim))
    std_c, std_p = cond.std(dim=dims, keepdim=True), pred.std(dim=dims, keepdim=True)
    ratio = torch.where(std_p > 0, std_c / std_p, torch.ones_like(std_p))
    return phi * (pred * ratio) + (1 - phi) * pred


class Guider:
    """Base class of guiders. Two-condition guiders (the former guidance rules) implement ``__call__(cond,
    uncond, w, info)`` and optionally ``passes(w)``; guiders of more predictions override ``needs`` and
    ``combine``.

    Class attributes a guider may set: ``perturbations`` (instance dict name → perturbation object, for
    ``perturbed:<name>`` predictions), ``uses_negative`` (it reads the negative prompt as :data:`NEGATIVE`,
    so :data:`UNCOND` is the empty prompt), ``schedulers`` (scheduler classes it is defined for;
    ``None``: any), ``families`` (model families it is defined for; ``None``: any), ``attention_layer`` (the
    self-attention layer whose map ``dependent_input`` reads), ``diffusers_class`` (the diffusers guider with
    the same ``forward``, for :mod:`stablefused.guider_config`)."""

    perturbations: dict = {}
    uses_negative = False
    schedulers: tuple[str, ...] | None = None
    families: tuple[str, ...] | None = None
    attention_layer: str | None = None
    diffusers_class: str | None = None
    model2: Any = None  # the second model's family (autoguidance), set by whoever loads it

    @classmethod
    def second_model(cls, params: dict) -> str | None:
        """The second model these parameters make the guider load next to the run's model (autoguidance's
        ``weak_model``), or None: checked before loading where a run has two models of its own (an SDXL
        refiner, whose conditioning such a second model does not take)."""
        return None

    def passes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.ones_like(w, dtype=torch.bool)
        return both, both

    def needs(self, w: torch.Tensor, info: StepInfo) -> dict[str, torch.Tensor]:
        need_cond, need_uncond = self.passes(w)
        return {COND: need_cond, UNCOND: need_uncond}

    def combine(self, p: dict[str, torch.Tensor], w: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return self(p[COND], p[UNCOND], w, info)

    def dependent_input(self, name: str, p: dict[str, torch.Tensor], maps: dict[str, torch.Tensor],
                        w: torch.Tensor, info: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """For the dependent prediction ``name``: every row's network input (B, ...) and (B,) bool, condition
        on the prompt (True) or the unconditional prompt (False); ``p``: the main call's predictions,
        ``maps``: its attention maps by prediction name (with ``attention_layer``, else empty)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-run state; the base resets the guider's perturbations (e.g. a dropout generator)."""
        for part in (self.perturbations or {}).values():
            if hasattr(part, "reset"):
                part.reset()

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError


GuidanceRule = Guider  # the former name: a guidance rule is a guider of two conditions


class GuidanceSchedule:
    """Base class of guidance schedules; subclasses implement ``__call__``."""

    def __call__(self, base: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError


class Guidance:
    """A schedule and a guider, as the loop uses them."""

    def __init__(self, schedule: Any, rule: Any):
        self.schedule, self.rule = schedule, rule

    @classmethod
    def from_config(cls, cfg: Any) -> "Guidance":
        """``cfg`` (a dict or DictConfig) has ``schedule``, ``rule`` (plugin names) and optional
        ``params``/``rule_params``."""
        schedule = registry.create("guidance_schedule", cfg.get("schedule", "constant"), **dict(cfg.get("params") or {}))
        rule = registry.create("guidance_rule", cfg.get("rule", "cfg"), **dict(cfg.get("rule_params") or {}))
        return cls(schedule, rule)

    @classmethod
    def default(cls) -> "Guidance":
        return cls.from_config({"schedule": "constant", "rule": "cfg"})

    @property
    def guider(self) -> Any:
        return self.rule

    @property
    def uses_negative(self) -> bool:
        return bool(getattr(self.rule, "uses_negative", False))

    def reset(self) -> None:
        for part in (self.schedule, self.rule):
            if hasattr(part, "reset"):
                part.reset()

    def scale(self, base: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return self.schedule(base, info)

    def bind(self, family: Any) -> None:
        """Called once per batch with the model's family: a guider loads what it needs next to it (a second
        model). A guider defined for some families only refuses others in one line."""
        families = getattr(self.rule, "families", None)
        if families and family.name not in families:
            raise ValueError(_family_problem(self.rule, family.name))
        if hasattr(self.rule, "bind"):
            self.rule.bind(family)

    def needs(self, w: torch.Tensor, info: StepInfo) -> dict[str, torch.Tensor]:
        """Rows that need each prediction; for an object with only the rule interface, from ``passes``."""
        if hasattr(self.rule, "needs"):
            return self.rule.needs(w, info)
        need_cond, need_uncond = self.rule.passes(w)
        return {COND: need_cond, UNCOND: need_uncond}

    def combine(self, p: dict[str, torch.Tensor], w: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if hasattr(self.rule, "combine"):
            return self.rule.combine(p, w, info)
        return self.rule(p[COND], p[UNCOND], w, info)

    @property
    def perturbations(self) -> dict:
        return dict(getattr(self.rule, "perturbations", None) or {})

    @property
    def model2(self) -> Any:
        return getattr(self.rule, "model2", None)

    @property
    def attention_layer(self) -> str | None:
        return getattr(self.rule, "attention_layer", None)

    def dependent_input(self, name, p, maps, w, info) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rule.dependent_input(name, p, maps, w, info)


def _family_problem(cls: Any, family: str) -> str:
    name = getattr(cls, "plugin_name", type(cls).__name__)
    return f"guidance.rule={name}: defined for model families {', '.join(cls.families)} only, not {family}"


def guider_problems(cfg: Any, rule: str | None = None, params: Any = None) -> list[str]:
    """Settings a guider (``rule`` with ``params``, else ``guidance.rule`` with ``guidance.rule_params``) cannot
    run with, one line each (checked before the model loads): a guider defined only for some schedulers
    (CFG++) under another one, or only for some model families (SAG) on another (where the family is known
    before loading), or one that loads a second model (autoguidance's weak model) in a run that has an SDXL
    refiner (``model.refiner``: the second model takes the base's conditioning, not the refiner's)."""
    try:
        cls = registry.get("guidance_rule", rule or cfg.guidance.get("rule", "cfg"))
    except Exception:  # an unknown guider is reported by the plugin check
        return []
    allowed, scheduler = getattr(cls, "schedulers", None), cfg.get("scheduler") or {}
    if allowed and scheduler.get("cls") not in allowed:
        return [f"guidance.rule={cls.plugin_name}: defined for the {', '.join(allowed)} only, not "
                f"scheduler={scheduler.get('name')} ({scheduler.get('cls') or 'the model default'}); use "
                f"scheduler=ddim or scheduler=euler"]
    if getattr(cls, "families", None) and cfg.get("model") is not None:
        from stablefused.families import family_of_model_cfg

        family = family_of_model_cfg(cfg.model)  # None: known only once loaded (bind checks it then)
        if family is not None and family not in cls.families:
            return [_family_problem(cls, family)]
    refiner = cfg.get("model").get("refiner") if cfg.get("model") is not None else None
    if refiner and hasattr(cls, "second_model"):
        from omegaconf import OmegaConf

        if rule is None:
            params = cfg.guidance.get("rule_params")
        if OmegaConf.is_config(params):
            params = OmegaConf.to_container(params, resolve=True)
        second = cls.second_model(dict(params or {})) if isinstance(params, (dict, type(None))) else None
        if second:
            return [f"guidance.rule={cls.plugin_name}: its second model ({second}) takes the base model's conditioning, "
                    f"not the refiner's; drop model.refiner={refiner} or guide without a second model"]
    return []


class PerturbedGuider(Guider):
    """CFG plus a term pushing away from a perturbed conditional prediction (PAG, SEG, SLG)::

        out = u + w (c - u) + s (c - p)       p: the conditional prediction under the perturbation

    ``s`` (``scale``) is constant; the perturbation term is on for iterations in ``[start, stop)`` counted as
    diffusers' guiders count them (``int(start·n) < i < int(stop·n)``; both ``None``, the default: every step,
    as diffusers' PAG pipelines). w = 1 gives c + s (c - p), the method without CFG (the papers' and
    ``StableDiffusionPAGPipeline``'s formula; diffusers' guider classes give p + s (c - p) there instead),
    w = 0 gives u + s (c - p). ``rescale`` > 0 applies Lin et al.'s rescale against c (diffusers'
    ``guidance_rescale``). Subclasses set ``perturbation`` (the plugin name) and the defaults."""

    perturbation = ""

    def __init__(self, scale: float, start: float | None, stop: float | None, rescale: float, **perturbation: Any):
        self.scale, self.start, self.stop, self.rescale = float(scale), start, stop, float(rescale)
        self.perturbations = {self.perturbation: registry.create("perturbation", self.perturbation, **perturbation)}
        self.name = perturbed(self.perturbation)

    def active(self, info: StepInfo) -> bool:
        return self.scale != 0 and in_window(info, self.start, self.stop, strict_start=True)

    def term_rows(self, w: torch.Tensor) -> torch.Tensor | None:
        """Rows the perturbation term applies to while :meth:`active`; ``None``: every row."""
        return None

    def needs(self, w, info):
        on = self.active(info)
        everyone = torch.ones_like(w, dtype=torch.bool)
        need_cond = everyone if (on or self.rescale > 0) else w != 0
        rows = self.term_rows(w)
        perturbed_rows = (everyone if rows is None else rows) if on else ~everyone
        return {COND: need_cond, UNCOND: w != 1, self.name: perturbed_rows}

    def combine(self, p, w, info):
        c, u = p[COND], p[UNCOND]
        out = u + per_sample(w, c) * (c - u)
        if self.active(info):
            guided = out + self.scale * (c - p[self.name])
            rows = self.term_rows(w)
            out = guided if rows is None else torch.where(rows.view(-1, *([1] * (c.ndim - 1))), guided, out)
        return rescale(out, c, self.rescale)
