from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stablefused import records as rec_io
from stablefused.registry import PluginError, register
from stablefused.samplers import sampler_label

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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.stats)
        ncols = min(2, n)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.2 * nrows), dpi=110, squeeze=False)
        for ax, stat in zip(axes.flat, self.stats):
            for label, (xs, ys) in series[stat].items():
                ax.plot(xs, ys, marker=".", label=label)  # NaN (a skipped pass, no previous x̂0) is a gap
            ax.set_title(stat)
            ax.set_xlabel({"step": "step", "t": "timestep t", "sigma": "σ"}[self.x])
            if self.x in ("t", "sigma"):
                ax.invert_xaxis()  # time runs from noise (left) to clean (right)
            if self.log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if len(labels) > 1:
            fig.legend(handles, labels, loc="upper right", fontsize=7, title=self.group)
        sampler = run.cfg.scheduler.get("label") or sampler_label(run.sampler.scheduler)
        fig.suptitle(f"{run.cfg.name}: denoising statistics ({sampler}, {rec.index.get('steps')} steps)")
        fig.tight_layout(rect=(0, 0, 0.88 if len(labels) > 1 else 1, 1))
        path = run.path(f"{self.name}.png")
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        run.add_artifact(path, "plot", caption=f"step statistics by {self.group}", log_key=self.name)
        return [path]
