from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from stablefused.hooks import LoopContext, StepState
from stablefused.records import SelectedSteps, recorder_name, save_recorder
from stablefused.registry import register

STATS = ("guidance_scale", "guidance_delta_norm", "eps_guided_norm", "latent_mean", "latent_std", "x0_mean",
         "x0_std", "x0_change", "cos_cond_uncond", "delta_parallel_norm", "delta_orthogonal_norm", "extra_delta_norm",
         "guidance_effect_norm", "nfe")


@register("recorders", "stats")
class Stats(SelectedSteps):
    """Per-step statistics per sample (guidance-delta norm, latent and x̂0 mean/std, x̂0 change), to W&B too.

    Tensors ``stats.<name>`` (N, S), float32; t and σ of each step are in the index. Per sample and step:
    ``guidance_scale`` (the scale used), ``guidance_delta_norm`` = ‖ε_cond − ε_uncond‖₂ (over all latent
    elements; NaN where a pass was skipped, e.g. at guidance 0 or 1 with ``cfg``), ``eps_guided_norm`` = ‖ε_guided‖₂, ``latent_mean``/``latent_std``
    of x_t, ``x0_mean``/``x0_std`` of x̂0, ``x0_change`` = ‖x̂0 − x̂0 of the previous step‖₂ (NaN at the
    first).
    Guidance telemetry (every guider): ``cos_cond_uncond`` = cos(ε_cond, ε_uncond); ``delta_parallel_norm`` /
    ``delta_orthogonal_norm``: the guidance delta Δ = ε_cond − ε_uncond split against ε_cond as APG splits it
    (‖Δ∥‖, ‖Δ⊥‖); ``extra_delta_norm``: the norm of the guider's third term, ‖ε_cond − ε_perturbed‖ (PAG, SEG,
    SLG), ‖ε_cond − ε_weak‖ (autoguidance), ‖ε_negative − ε_uncond‖ (perp-neg) or ‖ε_uncond − ε_degraded‖
    (SAG; the conditional at w = 1), NaN where not evaluated;
    ``guidance_effect_norm`` = ‖ε_guided − ε_cond‖ (how far guidance moved the prediction);
    ``nfe``: network rows this sample evaluated at this step (2 for CFG, 1 where a pass was skipped, 3 for PAG).
    Values stay on the device until the loop ends (no sync per step). ``log`` sends one W&B chart per statistic
    (``denoise/<stat>``, x = step), a line per guider and guidance scale (mean over their samples).
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
        c, u, delta = state.eps_cond, state.eps_uncond, state.eps_cond - state.eps_uncond
        extra, has_extra = self._extra(state)
        c64, d64 = c.flatten(1).double(), delta.flatten(1).double()
        par = (d64 * c64).sum(1, keepdim=True) / c64.pow(2).sum(1, keepdim=True).clamp_min(1e-30) * c64
        a = torch.stack([state.x_t, x0, delta, state.eps_guided, change, extra, state.eps_guided - c])
        a = a.flatten(2).float()  # (7, B, D)
        std, mean = torch.std_mean(a[:2], dim=2)
        norms = torch.linalg.vector_norm(a[2:], dim=2)
        if prev is None:
            norms[2] = float("nan")
        # a skipped pass leaves no difference to measure: NaN (a gap in plots), not a misleading 0
        both = state.has_cond & state.has_uncond
        norms[0] = torch.where(both, norms[0], float("nan"))
        norms[3] = torch.where(has_extra, norms[3], float("nan"))
        cos = torch.nn.functional.cosine_similarity(c.flatten(1).float(), u.flatten(1).float(), dim=1)
        split = torch.stack([par.norm(dim=1), (d64 - par).norm(dim=1)]).to(a)
        split = torch.where(both, split, float("nan"))
        needs = state.needs or {"cond": state.has_cond, "uncond": state.has_uncond}
        nfe = torch.stack([v.to(a.device) for v in needs.values()]).sum(0).to(a)
        row = torch.stack([state.guidance_scale.to(a), norms[0], norms[1], mean[0], std[0], mean[1], std[1],
                           norms[2], torch.where(both, cos.to(a), float("nan")), split[0], split[1], norms[3],
                           norms[4], nfe], dim=1)
        if self._keep is not None:
            row = row.index_select(0, self._keep)
        self._rows.append(row)
        self._meta.append({"step": step, "t": self.tracker.t(state), "sigma": float(state.sigma)})

    @staticmethod
    def _extra(state: StepState) -> tuple[torch.Tensor, torch.Tensor]:
        """The guider's third term (see the class docstring) and where it was evaluated."""
        preds, needs = state.predictions or {}, state.needs or {}
        for name, pred in preds.items():
            if name not in ("cond", "uncond"):
                base = state.eps_uncond if name == "negative" or name.startswith("dependent:") else state.eps_cond
                return base - pred, needs[name].to(pred.device)
        return torch.zeros_like(state.eps_cond), torch.zeros_like(state.has_cond, dtype=torch.bool)

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
        """One W&B chart per statistic (``denoise/<stat>``, x = step), a line per guider and guidance scale:
        the mean over its samples (steps where no sample has a value are left out of that line)."""
        tensors, info = self.result(run)
        records = {int(r["index"]): r for r in run.records}
        rule = run.cfg.guidance.get("rule", "cfg")
        groups: dict[str, list[int]] = {}
        for pos, i in enumerate(info["samples"]):
            r = records.get(i, {})
            label = f"{r.get('guidance_variant') or r.get('guidance_rule') or rule} w={float(r.get('guidance_scale', float('nan'))):g}"
            groups.setdefault(label, []).append(pos)
        steps = list(info["steps"])
        for name in STATS:
            values = tensors[f"stats.{name}"][0]
            keys, ys = [], []
            for label, pos in groups.items():
                col = values[pos].nanmean(0).tolist()
                if any(v == v for v in col):
                    keys.append(label)
                    ys.append([v if v == v else None for v in col])
            if keys:
                run.logger.line_series(f"denoise/{name}", steps, ys, keys, title=name, xname="step")
