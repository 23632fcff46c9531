from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stablefused import records as rec_io
from stablefused.plots import step_panels
from stablefused.registry import PluginError, register
from stablefused.scheduler_names import sampler_label

X_AXES = ("step", "t", "sigma")
GROUPS = ("guidance_scale", "sample", "prompt")


@register("visualizers", "stats_plot")
class StatsPlot:
    """PNG line plots of recorded step statistics (one panel per stat, one line per guidance scale).

    ``stats``: names recorded by the ``stats`` recorder (guidance_delta_norm, eps_guided_norm, latent_mean,
    latent_std, x0_mean, x0_std, x0_change, guidance_scale, and the guidance telemetry cos_cond_uncond,
    delta_parallel_norm, delta_orthogonal_norm, extra_delta_norm, guidance_effect_norm, nfe). ``x``: step, t or sigma. ``group``: one line
    per guidance_scale (mean over its samples), per prompt, or per sample. ``log_y``: log-scale y axes.
    Needs recorder ``stats``.
    """

    run_params = {"stats": "list"}

    def __init__(self, stats: list[str] | str = ("guidance_delta_norm", "latent_std", "x0_std", "x0_change"),
                 x: Literal["step", "t", "sigma"] = "step", group: Literal["guidance_scale", "sample", "prompt"] = "guidance_scale",
                 log_y: bool = False, filename: str = "stats_plot"):
        if x not in X_AXES:
            raise PluginError(f"visualizers.stats_plot: x={x!r}: must be one of {', '.join(X_AXES)}")
        if group not in GROUPS:
            raise PluginError(f"visualizers.stats_plot: group={group!r}: must be one of {', '.join(GROUPS)}")
        self.stats = [stats] if isinstance(stats, str) else list(stats)
        self.x, self.group, self.log_y, self.name = x, group, bool(log_y), str(filename)

    @classmethod
    def requires(cls, params: dict) -> list[str]:
        return ["stats"]

    def series(self, rec: Any) -> dict[str, dict[str, tuple[list, np.ndarray]]]:
        """What the plot draws: per stat, per line label, (x values, y values) — y is the mean over the
        group's samples ignoring NaN, and NaN where no sample has a value (drawn as a gap)."""
        available = rec.stats
        missing = [s for s in self.stats if s not in available]
        if missing:
            raise PluginError(f"visualizers.stats_plot: stats {missing} not recorded; recorded: {', '.join(available)}")
        key = f"stats.{self.stats[0]}"
        xs = {"step": [s + 1 for s in rec.steps(key)], "t": rec.t(key), "sigma": rec.sigma(key)}[self.x]
        groups: dict[Any, list[int]] = {}
        for p, m in enumerate(rec.samples(key)):
            g = {"guidance_scale": m.get("guidance_scale"), "prompt": m.get("prompt"),
                 "sample": m.get("index")}[self.group]
            groups.setdefault(g, []).append(p)
        out: dict[str, dict[str, tuple[list, np.ndarray]]] = {}
        for stat in self.stats:
            values = available[stat].float().numpy()  # (N, S)
            out[stat] = {}
            for g, pos in sorted(groups.items(), key=lambda kv: (kv[0] is None, str(kv[0]) if not
                                                                  isinstance(kv[0], (int, float)) else kv[0])):
                label = f"w={g:g}" if self.group == "guidance_scale" and g is not None else str(g)[:30]
                with warnings.catch_warnings():  # all-NaN columns (skipped passes, first x0_change)
                    warnings.simplefilter("ignore", RuntimeWarning)
                    out[stat][label] = (xs, np.nanmean(values[pos], axis=0))
        return out

    def __call__(self, run: Any) -> list[Path]:
        rec_io.require(run, "stats_plot", ["stats"])
        rec = rec_io.from_run(run)
        series = self.series(rec)
        sampler = run.cfg.scheduler.get("label") or sampler_label(run.sampler.scheduler)
        path = step_panels({stat: series[stat] for stat in self.stats}, run.path(f"{self.name}.png"),
                           f"{run.cfg.name}: denoising statistics ({sampler}, {rec.index.get('steps')} steps)",
                           {"step": "step", "t": "timestep t", "sigma": "σ"}[self.x],
                           reverse_x=self.x in ("t", "sigma"), log_y=self.log_y, legend_title=self.group)
        run.add_artifact(path, "plot", caption=f"step statistics by {self.group}", log_key=self.name)
        return [path]
