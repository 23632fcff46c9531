"""Runners: turn a validated config into images, files and logs. ``task`` picks the runner.

A :class:`Run` is what plugins see after sampling: the run dir, the sampler (to decode), the image records,
the recorders, and ``add_artifact`` to list a produced file in the manifest and log it to W&B.

Plugin kinds used here, besides guidance (see :mod:`stablefused.guidance`):

* ``recorders``: hooks (:mod:`stablefused.hooks`) with an optional ``save(run) -> list[Path]``.
* ``metrics``: ``__call__(images: list[PIL.Image], records: list[dict]) -> list[dict[str, float]]``.
* ``visualizers``: ``__call__(run: Run) -> list[Path]`` (register files with ``run.add_artifact``).
"""

from __future__ import annotations

import itertools
import logging
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from stablefused import registry
from stablefused.guidance import Guidance
from stablefused.logger import NullLogger
from stablefused.models import Components
from stablefused.outputs import Manifest, grid, save_png, to_uint8
from stablefused.pipeline import Sampler

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    components: Components
    sampler: Sampler
    guidance: Guidance
    logger: NullLogger
    manifest: Manifest
    recorders: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    visualizers: dict[str, Any] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per image, as in the manifest
    images: list[Image.Image] = field(default_factory=list)  # same order as records
    stats: dict = field(default_factory=lambda: {"unet_rows": 0, "model_calls": 0})

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_images(self, images: np.ndarray, records: list[dict]) -> list[Image.Image]:
        """Score a freshly generated batch (float images in [0, 1]) with the selected metrics, write each PNG
        (with its parameters) and manifest line at once, and keep them for grids and logging."""
        pil = [Image.fromarray(a) for a in to_uint8(images)]
        _score(self, pil, records)
        for img, rec in zip(pil, records):
            save_png(img, self.run_dir / rec["path"], rec)
            self.manifest.append(rec)
            self.records.append(rec)
            self.images.append(img)
        return pil

    def add_artifact(self, path: Path, kind: str, caption: str | None = None, log_key: str | None = None,
                     **extra: Any) -> None:
        """List ``path`` (under the run dir) in the manifest and log it to W&B (``kind``: image, video,
        plot, file)."""
        path = Path(path)
        rel = str(path.relative_to(self.run_dir))
        self.manifest.append({"type": kind, "path": rel, "caption": caption, **extra})
        key = log_key or path.stem
        if kind in ("image", "plot", "grid"):
            self.logger.image(key, Image.open(path).convert("RGB"), caption)
        elif kind == "video" and path.suffix in (".mp4", ".gif", ".webm"):
            self.logger.video(key, path, caption)


def make_plugins(cfg: DictConfig, kind: str) -> dict[str, Any]:
    out = {}
    for name, params in (cfg.get(kind) or {}).items():
        params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        out[name] = registry.create(kind, name, **dict(params or {}))
    return out


def sample_rows(cfg: DictConfig) -> list[tuple[str, int]]:
    prompts = list(cfg.prompts or cfg.model.example_prompts)
    seeds = [int(s) for s in cfg.seeds]
    if cfg.combine == "zip":
        return list(zip(prompts, seeds))
    return list(itertools.product(prompts, seeds))


def image_size(cfg: DictConfig) -> tuple[int, int]:
    return int(cfg.height or cfg.model.height), int(cfg.width or cfg.model.width)


def run_txt2img(run: Run) -> None:
    """Every (prompt, seed) row under every guidance scale, in shared batches; grid rows = prompt/seed,
    columns = guidance scale."""
    cfg = run.cfg
    rows, scales = sample_rows(cfg), [float(g) for g in cfg.guidance_scales]
    height, width = image_size(cfg)
    cells = [(r, c, p, s, g) for r, (p, s) in enumerate(rows) for c, g in enumerate(scales)]
    hooks = list(run.recorders.values())
    for chunk in _batched(cells, cfg.batch_size):
        samples = [dict(index=len(run.records) + k, row=r, col=c, prompt=p, seed=s, guidance_scale=g)
                   for k, (r, c, p, s, g) in enumerate(chunk)]
        gen = run.sampler.txt2img(
            [x["prompt"] for x in samples], [x["seed"] for x in samples], [x["guidance_scale"] for x in samples],
            cfg.negative_prompt, steps=cfg.steps, height=height, width=width, guidance=run.guidance,
            hooks=hooks, samples=samples, eta=cfg.eta, progress=cfg.progress,
        )
        for k in run.stats:
            run.stats[k] += gen.context.stats[k]
        run.add_images(gen.images, [_image_record(run, x, height, width) for x in samples])
        log.info("%d/%d images", len(run.records), len(cells))

    grid_img = grid(
        run.images, len(rows), len(scales),
        row_labels=[_wrap(f"{p}\nseed {s}") for p, s in rows],
        col_labels=[f"guidance {g:g}" for g in scales],
    )
    grid_path = run.path("grid.png")
    grid_img.save(grid_path)
    run.add_artifact(grid_path, "grid", caption=f"{cfg.name}: rows prompt/seed, columns guidance", log_key="grid")
    _log_images(run)
    _summarise_metrics(run)


def _batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _wrap(text: str, width: int = 28) -> str:
    return "\n".join(line for part in text.split("\n") for line in textwrap.wrap(part, width) or [""])


def _image_record(run: Run, x: dict, height: int, width: int) -> dict:
    cfg = run.cfg
    return {
        "type": "image",
        "path": f"images/{x['index']:04d}_r{x['row']}_c{x['col']}_s{x['seed']}.png",
        "index": x["index"], "prompt": x["prompt"], "negative_prompt": cfg.negative_prompt, "seed": x["seed"],
        "guidance_scale": x["guidance_scale"], "steps": int(cfg.steps), "scheduler": cfg.scheduler.name,
        "scheduler_class": type(run.sampler.scheduler).__name__, "model": cfg.model.name, "height": height,
        "width": width, "guidance_schedule": cfg.guidance.schedule, "guidance_rule": cfg.guidance.rule,
        "row": x["row"], "col": x["col"],
    }


def _score(run: Run, images: list[Image.Image], records: list[dict]) -> None:
    for name, metric in run.metrics.items():
        for rec, values in zip(records, metric(images, records)):
            rec.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()})


def metric_keys(records: list[dict]) -> list[str]:
    base = {"type", "path", "index", "prompt", "negative_prompt", "seed", "guidance_scale", "steps", "scheduler",
            "scheduler_class", "model", "height", "width", "guidance_schedule", "guidance_rule", "row", "col"}
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in base and (v is None or isinstance(v, (int, float))):
                keys.setdefault(k)
    return list(keys)


def _log_images(run: Run) -> None:
    if run.logger.run is None:  # logger=none: skip building W&B objects
        return
    captions = [f"{r['prompt']} | seed {r['seed']} | guidance {r['guidance_scale']:g}" for r in run.records]
    for i in range(0, len(run.images), 100):  # W&B keeps at most 108 images per logged list
        run.logger.images("images", run.images[i : i + 100], captions[i : i + 100])
    mkeys = metric_keys(run.records)
    columns = ["image", "prompt", "seed", "guidance_scale", *mkeys]
    rows = [[img, r["prompt"], r["seed"], r["guidance_scale"], *[r.get(k) for k in mkeys]]
            for img, r in zip(run.images, run.records)]
    run.logger.table("samples", columns, rows)


def summarise_by(records: list[dict], key: str) -> dict[Any, dict[str, float]]:
    """Mean of every metric per value of ``key`` (NaN/None values skipped)."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    out = {}
    for value, recs in sorted(groups.items()):
        out[value] = {}
        for m in metric_keys(recs):
            vals = [r[m] for r in recs if r.get(m) is not None]
            out[value][m] = float(np.mean(vals)) if vals else float("nan")
    return out


def _summarise_metrics(run: Run) -> None:
    mkeys = metric_keys(run.records)
    if not mkeys:
        return
    summary = summarise_by(run.records, "guidance_scale")
    import json

    path = run.path("metrics_by_guidance.json")
    path.write_text(json.dumps({str(g): v for g, v in summary.items()}, indent=2))
    run.add_artifact(path, "file", caption="mean metrics per guidance scale")
    rows = [[g, m, v] for g, vals in summary.items() for m, v in vals.items()]
    run.logger.table("metrics_by_guidance", ["guidance_scale", "metric", "value"], rows)
    run.logger.summary({f"{m}@{g:g}": v for g, vals in summary.items() for m, v in vals.items()})
    if len(summary) > 1:
        plot = plot_metrics(summary, run.path("adherence.png"), title=f"{run.cfg.model.name}: metrics vs guidance")
        run.add_artifact(plot, "plot", caption="mean metric per guidance scale", log_key="adherence")
        for m in mkeys:
            run.logger.line_plot(f"{m}_vs_guidance", ["guidance_scale", m],
                                 [[g, vals[m]] for g, vals in summary.items()], "guidance_scale", m,
                                 title=f"{m} vs guidance")


def plot_metrics(summary: dict[float, dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(summary)
    keys = list(next(iter(summary.values())))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for k in keys:
        ax.plot(xs, [summary[x].get(k, float("nan")) for x in xs], marker="o", label=k)
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("mean value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


RUNNERS: dict[str, Callable[[Run], None]] = {"txt2img": run_txt2img}


def _guidance_grid(run: Run) -> None:
    """``task=guidance_grid``: columns = guidance schedules/rules (:mod:`stablefused.guidance_experiment`)."""
    from stablefused.guidance_experiment import run_guidance_grid  # imported here: it imports this module

    run_guidance_grid(run)


RUNNERS["guidance_grid"] = _guidance_grid
