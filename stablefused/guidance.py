"""The guidance hook: a schedule (the scale at each step) and a rule (how predictions combine).

A **schedule** (plugin kind ``guidance_schedule``) maps each sample's base scale to this iteration's scale::

    class Schedule:
        def __call__(self, base: Tensor, info: StepInfo) -> Tensor   # (B,) -> (B,)

A **rule** (plugin kind ``guidance_rule``) combines the conditional and unconditional predictions::

    class Rule:
        def passes(self, w: Tensor) -> tuple[Tensor, Tensor]   # (need_cond, need_uncond), bool (B,)
        def __call__(self, cond, uncond, w, info) -> Tensor     # guided prediction
        def reset(self) -> None                                  # forget per-run state (momentum, ...)

``passes`` lets the loop skip half-batches: a rule that returns ``need_cond=False`` for a row promises that
its output for that row equals the unconditional prediction (and vice versa); the loop then fills the
missing prediction with the one it has, so the rule still sees full tensors. The base class needs both
passes everywhere, which is always correct.
"""

from __future__ import annotations

from typing import Any

import torch

from stablefused import registry
from stablefused.hooks import StepInfo


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


class GuidanceRule:
    """Base class of guidance rules; subclasses implement ``__call__``."""

    def passes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.ones_like(w, dtype=torch.bool)
        return both, both

    def reset(self) -> None:
        pass

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError


class GuidanceSchedule:
    """Base class of guidance schedules; subclasses implement ``__call__``."""

    def __call__(self, base: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError


class Guidance:
    """A schedule and a rule, as the loop uses them."""

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

    def reset(self) -> None:
        for part in (self.schedule, self.rule):
            if hasattr(part, "reset"):
                part.reset()

    def scale(self, base: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return self.schedule(base, info)
