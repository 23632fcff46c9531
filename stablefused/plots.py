"""Every plot StableFused draws (matplotlib, Agg backend, PNG without a software tag): metric means per
setting (lines or bars), the img2img strength trade-off, recorded step statistics, a sweep's metric lines.
Callers pass plain numbers; nothing here knows a run, a task or a plugin."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` (no "Software" tag unless ``kwargs`` say otherwise) and close it."""
    kwargs.setdefault("metadata", {"Software": None})
    fig.savefig(path, **kwargs)
    pyplot().close(fig)
    return path


def metric_lines(summary: dict[Any, dict[str, float]], path: Path, title: str, xlabel: str = "guidance scale") -> Path:
    """Mean of each metric (one line each) per value of a setting (``summary``: value -> metric -> mean)."""
    plt = pyplot()
    xs = list(summary)
    keys = list(next(iter(summary.values())))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for k in keys:
        ax.plot(xs, [summary[x].get(k, float("nan")) for x in xs], marker="o", label=k)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def metric_bars(summary: list[dict], keys: list[str], path: Path, title: str, label_key: str = "variant") -> Path:
    """Grouped bars: per row of ``summary`` (labelled by ``label_key``) one bar per metric of ``keys``."""
    plt = pyplot()
    labels = [s[label_key] for s in summary]
    x = np.arange(len(labels))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(labels)), 4.0), dpi=120)
    for i, k in enumerate(keys):
        ax.bar(x + i * width - 0.4 + width / 2, [s.get(k, float("nan")) for s in summary], width, label=k)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean value")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def metric_vs(summary: list[dict], keys: list[str], x_key: str, xlabel: str, path: Path, title: str,
              label_key: str = "variant") -> Path:
    """A panel per metric of ``keys``: its value against ``x_key`` (e.g. NFE per image: a quality/cost
    Pareto plot), a labelled point per row of ``summary``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.0), dpi=120, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for s in summary:
            ax.scatter(s[x_key], s.get(k, float("nan")))
            ax.annotate(s[label_key], (s[x_key], s.get(k, float("nan"))), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def panels(xs: Sequence[float], series: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str,
           xlabel: str, ylabel: str, titles: Mapping[str, str] | None = None) -> Path:
    """One panel per key of ``series`` (titled by ``titles``), one line per label in it, shared y axis."""
    plt = pyplot()
    keys = list(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), dpi=100, sharey=True, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, ys in series[k].items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title((titles or {}).get(k, k), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def step_panels(series: Mapping[str, Mapping[str, tuple[Sequence, np.ndarray]]], path: Path, title: str,
                xlabel: str, reverse_x: bool = False, log_y: bool = False, legend_title: str | None = None) -> Path:
    """Per-step curves: one panel per statistic (two columns), one line per label; NaN is a gap."""
    plt = pyplot()
    n = len(series)
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.2 * nrows), dpi=110, squeeze=False)
    for ax, (stat, lines) in zip(axes.flat, series.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_title(stat)
        ax.set_xlabel(xlabel)
        if reverse_x:
            ax.invert_xaxis()  # time runs from noise (left) to clean (right)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="upper right", fontsize=7, title=legend_title)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88 if len(labels) > 1 else 1, 1))
    return save(fig, path)


def xy_lines(lines: Mapping[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Points (x, y) per label, each label one line sorted by x (a sweep's metric against a swept setting)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pts in lines.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(lines) and len(lines) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path, dpi=100, metadata=None)
