from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from stablefused.hooks import LoopContext, StepState
from stablefused.records import SelectedSteps, recorder_name, save_recorder
from stablefused.registry import register

STATS = ("guidance_scale", "guidance_delta_norm", "eps_guided_norm", "latent_mean", "latent_std", "x0_mean",
         "x0_std", "x0_change")


@register("recorders", "stats")
class Stats(SelectedSteps):
    """Per-step statistics per sample (guidance-delta norm, latent and x̂0 mean/std, x̂0 change), to W&B too.

    Tensors ``stats.<name>`` (N, S), float32; t and σ of each step are in the index. Per sample and step:
    ``guidance_scale`` (the scale used), ``guidance_delta_norm`` = ‖ε_cond − ε_uncond‖₂ (over all latent
    elements; NaN where a pass was skipped, e.g. at guidance 0 or 1 with ``cfg``), ``eps_guided_norm`` = ‖ε_guided‖₂, ``latent_mean``/``latent_std``
    of x_t, ``x0_mean``/``x0_std`` of x̂0, ``x0_change`` = ‖x̂0 − x̂0 of the previous step‖₂ (NaN at the
    first).
    Values stay on the device until the loop ends (no sync per step). ``log`` sends them to W&B as metrics
    ``denoise/<stat>/w=<guidance>`` (mean over the samples of each guidance scale) against ``denoise_step``.
    """

    def __init__(self, every: int = 1, samples: list[int] | int | None = None, per: Literal["step", "call"] = "step",
                 log: bool = True):
        super().__init__(every, samples, per)
        self.log = bool(log)

    def before_loop(self, ctx: LoopContext) -> None:
        super().before_loop(ctx)
        self._rows: list[torch.Tensor] = []
        self._meta: list[dict] = []
        self._prev_x0 = None
        self._pending: tuple | None = None

    def on_step(self, state: StepState) -> None:
        if not self._indices:
            return None
        step, starts = self.tracker.observe(state)
        if not starts:
            return None
        prev, self._prev_x0 = self._prev_x0, state.x0_pred
        if step % self.every:  # not an every-k step: keep what it needs in case it is the last one
            self._pending = (step, state, prev)
        else:
            self._pending = None
            self._append(step, state, prev)
        return None

    def _append(self, step: int, state: StepState, prev: Any) -> None:
        x0 = state.x0_pred
        change = x0 - prev if prev is not None else torch.zeros_like(x0)
        # one stack, two reductions: fewer small ops per step than one reduction per statistic
        a = torch.stack([state.x_t, x0, state.eps_cond - state.eps_uncond, state.eps_guided, change])
        a = a.flatten(2).float()  # (5, B, D)
        std, mean = torch.std_mean(a[:2], dim=2)
        norms = torch.linalg.vector_norm(a[2:], dim=2)
        if prev is None:
            norms[2] = float("nan")
        # a skipped pass leaves no difference to measure: NaN (a gap in plots), not a misleading 0
        norms[0] = torch.where(state.has_cond & state.has_uncond, norms[0], float("nan"))
        row = torch.stack([state.guidance_scale.to(a), norms[0], norms[1], mean[0], std[0], mean[1], std[1],
                           norms[2]], dim=1)
        if self._keep is not None:
            row = row.index_select(0, self._keep)
        self._rows.append(row)
        self._meta.append({"step": step, "t": self.tracker.t(state), "sigma": float(state.sigma)})

    def after_loop(self, ctx: LoopContext, latents: torch.Tensor) -> None:
        if not self._indices:
            return
        if self._pending is not None:  # the last step was not an every-k step: keep it anyway
            self._append(*self._pending)
        if self._steps is None:
            self._steps = self._meta
        elif [m["step"] for m in self._meta] != [m["step"] for m in self._steps]:
            raise RuntimeError("stats recorder: batches of one run recorded different steps")
        self._chunks.append((self._indices, torch.stack(self._rows, dim=1).cpu()))  # (n, S, stats)
        self._prev_x0 = self._pending = None

    def result(self, run: Any = None) -> tuple[dict, dict]:
        indices = [i for idx, _ in self._chunks for i in idx]
        order = sorted(range(len(indices)), key=indices.__getitem__)
        tensors = {}
        if self._chunks:
            allrows = torch.cat([c for _, c in self._chunks])[order]
            for k, name in enumerate(STATS):
                tensors[f"stats.{name}"] = (allrows[..., k].contiguous(), ("sample", "step"))
        steps = self._steps or []
        info = {"kind": "stats", "per": self.tracker.per, "every": self.every, "stats": list(STATS),
                "steps": [s["step"] for s in steps], "t": [s["t"] for s in steps],
                "sigma": [s["sigma"] for s in steps], "samples": sorted(indices)}
        return tensors, info

    def save(self, run: Any) -> list[Path]:
        paths = save_recorder(run, recorder_name(self), self)
        if self.log and run.logger.run is not None:
            self.log_metrics(run)
        return paths

    def log_metrics(self, run: Any) -> None:
        """Per step, the mean of each stat over the samples of each guidance scale, against ``denoise_step``."""
        tensors, info = self.result(run)
        scale_of = {int(r["index"]): float(r["guidance_scale"]) for r in run.records}
        groups: dict[float, list[int]] = {}
        for pos, i in enumerate(info["samples"]):
            groups.setdefault(scale_of.get(i, float("nan")), []).append(pos)
        for s, step in enumerate(info["steps"]):
            values: dict[str, float] = {"denoise_step": step, "denoise/t": info["t"][s],
                                        "denoise/sigma": info["sigma"][s]}
            for name in STATS:
                col = tensors[f"stats.{name}"][0][:, s]
                for g, pos in groups.items():
                    v = float(col[pos].mean())
                    values[f"denoise/{name}/w={g:g}"] = v if v == v else None
            run.logger.metrics({k: v for k, v in values.items() if v is not None}, step_metric="denoise_step")
