"""One report per sweep, from the files its jobs wrote: ``python -m stablefused report <sweep dir>`` (and
automatically at the end of every ``-m`` run, see :class:`stablefused.sweeps.SweepReport`).

Writes into the sweep dir:

- ``summary.csv``: one row per job: its swept values and overrides, status (+ reason), images, frame PNGs and
  videos it wrote, wall time,
  UNet rows and model calls (from the manifest's final ``run`` record; a resumed job counts only the work of
  its last run, not what a killed run had done before), and the mean of every numeric metric over the job's
  images
- ``report_grid.png``: one row per job, labelled with its swept overrides; cells are the job's images (or
  its ``grid.png`` when a job has more than ``max_cells`` images; a walk: ``max_cells`` evenly spaced frames)
- ``plots/<metric>_vs_<key>.png``: each metric's mean against each swept key with at least two numeric
  values (one line per combination of the other swept keys)
- ``xyz_<z>.png`` (``experiment=xyz``): one grid per z value, rows/columns the y/x values (:func:`xyz_grids`)
- ``report.md``: all of the above in one page

A job is a sub-directory holding ``.hydra/overrides.yaml``. Its status comes from ``status.json``; a job
without one (or still ``running``) did not finish.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablefused.scores import record_metric_keys

# manifest image-record keys that describe the image rather than measure it
@dataclass
class Job:
    dir: Path
    name: str
    overrides: list[str]
    status: str = "not finished"
    reason: str | None = None
    wall_s: float | None = None
    images: int = 0
    frame_pngs: int = 0  # frame PNGs (walks, videos)
    videos: int = 0  # MP4/GIF files (a walk's video, a text-to-video run's videos)
    unet_rows: int | None = None
    model_calls: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    image_paths: list[Path] = field(default_factory=list)  # the task's outputs: images, or a walk's frames
    image_records: list[dict] = field(default_factory=list)  # same order as image_paths
    label: str = ""

    def values(self) -> dict[str, str]:
        out = {}
        for o in self.overrides:
            if "=" in o:
                k, v = o.split("=", 1)
                out[k.lstrip("+~")] = v
        return out


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed job
                pass
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _wandb_summary(job_dir: Path) -> dict:
    for p in sorted(job_dir.glob("wandb/*run-*/files/wandb-summary.json"), reverse=True):  # newest first
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return {}


def _load_job(job_dir: Path) -> Job:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    job = Job(dir=job_dir, name=job_dir.name, overrides=[str(o) for o in overrides])
    status = {}
    if (job_dir / "status.json").is_file():
        status = json.loads((job_dir / "status.json").read_text())
        job.status = status.get("status", "unknown")
        if job.status == "running":
            job.status = "not finished"
        job.reason = status.get("reason")
        job.wall_s = status.get("wall_s")
    if job.status == "not finished" and not job.reason:
        job.reason = "no final status.json: the job was killed or is still running"
    recs = _read_jsonl(job_dir / "manifest.jsonl")

    def unique(kind: str) -> list[dict]:  # one record per path: the last wins (a resumed run may write it again)
        return list({r.get("path", i): r for i, r in enumerate(recs) if r.get("type") == kind}.values())

    images, frames = unique("image"), unique("frame")
    job.images, job.frame_pngs = len(images), len(frames)
    job.videos = len(unique("video"))
    # the task's outputs (one per cell index; what its metrics score): images, or a walk's frames
    outputs = unique(_output_type(job_dir, images, frames))
    job.image_records = [r for r in outputs if "path" in r]
    job.image_paths = [job_dir / r["path"] for r in job.image_records]
    sums: dict[str, list[float]] = {}
    for r in outputs:
        for k in record_metric_keys(r):
            if (x := _num(r[k])) is not None:
                sums.setdefault(k, []).append(x)
    job.metrics = {k: sum(v) / len(v) for k, v in sums.items()}
    # UNet rows and model calls: the manifest's final run record, else the job's status, else the manifest's
    # per-variant compute records (guidance_grid), else the W&B run summary. A resumed run counts only its
    # own work (the images it made), not the images a killed run had made before.
    run_rec = next((r for r in reversed(recs) if r.get("type") == "run"), {})
    compute = [r for r in recs if r.get("type") == "compute" and _num(r.get("unet_rows")) is not None]
    summary = _wandb_summary(job_dir)
    if job.wall_s is None:
        job.wall_s = run_rec.get("wall_s")
    for key in ("unet_rows", "model_calls"):
        v = run_rec.get(key, status.get(key))
        if v is None and compute and key == "unet_rows":
            v = sum(int(r["unet_rows"]) for r in compute)
        if v is None:
            v = summary.get(key)
        setattr(job, key, v)
    return job


def _output_type(job_dir: Path, images: list[dict], frames: list[dict]) -> str:
    """The manifest type of the job's outputs: its task's ``output_type`` (from .hydra/config.yaml), else
    image when it wrote images."""
    cfg = job_dir / ".hydra" / "config.yaml"
    try:
        from stablefused.tasks import get_task

        return get_task((yaml.safe_load(cfg.read_text()) or {}).get("task", "txt2img")).output_type
    except Exception:  # no config, or a task this install does not have
        return "image" if images or not frames else "frame"


def _job_order(d: Path) -> tuple:
    return (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)


def collect(sweep_dir: str | Path) -> list[Job]:
    """The sweep's jobs, in job order, with swept overrides as labels."""
    sweep_dir = Path(sweep_dir)
    dirs = sorted({p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}, key=_job_order)
    if not dirs and (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        dirs = [sweep_dir]  # a single run dir
    jobs = [_load_job(d) for d in dirs]
    swept = swept_keys(jobs)
    for j in jobs:
        vals = j.values()
        j.label = " ".join(f"{k}={vals.get(k, '-')}" for k in swept) or " ".join(j.overrides) or j.name
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys: dict[str, set] = {}
    for j in jobs:
        for k, v in j.values().items():
            keys.setdefault(k, set()).add(v)
    return [k for k, vs in keys.items() if len(vs) > 1 or any(k not in j.values() for j in jobs)]


def numeric_value(v: str) -> float | None:
    """An override value as a number: ``7.5`` -> 7.5, ``[3]`` -> 3.0 (a one-element list), else None."""
    try:
        x = yaml.safe_load(v)
    except yaml.YAMLError:
        return None
    if isinstance(x, list) and len(x) == 1:
        x = x[0]
    return _num(x)


def _metric_names(jobs: list[Job]) -> list[str]:
    names: dict[str, None] = {}
    for j in jobs:
        for k in j.metrics:
            names.setdefault(k)
    return list(names)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_rows(jobs: list[Job]) -> tuple[list[str], list[list[Any]]]:
    swept = swept_keys(jobs)
    metrics = _metric_names(jobs)
    header = ["job", *swept, "status", "images", "frame_pngs", "videos", "wall_s", "unet_rows", "model_calls",
              *metrics, "reason", "overrides"]
    rows = []
    for j in jobs:
        vals = j.values()
        rows.append([j.name, *[vals.get(k, "") for k in swept], j.status, j.images, j.frame_pngs, j.videos, j.wall_s,
                     j.unet_rows, j.model_calls, *[j.metrics.get(m) for m in metrics], j.reason or "",
                     " ".join(j.overrides)])
    return header, rows


def report_grid(jobs: list[Job], max_cells: int = 16):
    """One row per job, labelled with its swept overrides; None if no job made an image."""
    from PIL import Image

    from stablefused.outputs import grid

    if not any(j.image_paths for j in jobs):
        return None
    per_image = all(len(j.image_paths) <= max_cells for j in jobs)
    rows = []
    for j in jobs:
        g = j.dir / "grid.png"
        if per_image or not g.is_file():  # no grid (a walk): evenly spaced outputs (frames), at most max_cells
            paths = j.image_paths
            if len(paths) > max_cells:
                paths = [paths[round(k * (len(paths) - 1) / (max_cells - 1))] for k in range(max_cells)]
            rows.append([Image.open(p).convert("RGB") for p in paths if p.is_file()])
        else:
            rows.append([Image.open(g).convert("RGB")])
    cols = max(1, max(len(r) for r in rows))
    cells = [r[c] if c < len(r) else None for r in rows for c in range(cols)]
    labels = [f"#{j.name} {j.label}" + ("" if j.status == "ok" else f"\n({j.status})") for j in jobs]
    return grid(cells, rows=len(jobs), cols=cols, row_labels=[_wrap(x) for x in labels])


def _wrap(text: str, width: int = 32) -> str:
    import textwrap

    return "\n".join(line for part in text.split("\n") for line in (textwrap.wrap(part, width) or [""]))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def plots(jobs: list[Job], out_dir: Path) -> list[Path]:
    """Each metric's mean vs each swept key with >= 2 numeric values (ok jobs only); one line per
    combination of the other swept keys."""
    swept = swept_keys(jobs)
    ok = [j for j in jobs if j.status == "ok"]
    metrics = _metric_names(ok)
    written = []
    for key in swept:
        xs = {j.name: numeric_value(j.values().get(key, "")) for j in ok}
        if len({x for x in xs.values() if x is not None}) < 2:
            continue
        others = [k for k in swept if k != key]
        for metric in metrics:
            lines: dict[str, list[tuple[float, float]]] = {}
            for j in ok:
                x, y = xs[j.name], j.metrics.get(metric)
                if x is None or y is None:
                    continue
                vals = j.values()
                lines.setdefault(" ".join(f"{k}={vals.get(k, '-')}" for k in others), []).append((x, y))
            if not any(len(v) >= 2 for v in lines.values()):
                continue
            from stablefused.plots import xy_lines

            path = xy_lines(lines, out_dir / f"{_safe(metric)}_vs_{_safe(key)}.png", key, metric,
                            f"{metric}: mean over each job's images")
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------- X/Y/Z plot
# batched list settings -> the image-record key holding each image's value
BATCHED = {"guidance_scales": "guidance_scale", "seeds": "seed", "prompts": "prompt"}


def xyz_axes(jobs: list[Job]) -> dict[str, str | None] | None:
    """The ``xyz`` node of the sweep's config (``experiment=xyz``) with its unnamed y/z axes filled in from
    the swept settings in command-line order; None when the sweep is not an X/Y/Z plot."""
    cfgs = [j.dir / ".hydra" / "config.yaml" for j in jobs if (j.dir / ".hydra" / "config.yaml").is_file()]
    node = (yaml.safe_load(cfgs[0].read_text()) or {}).get("xyz") if cfgs else None
    if not isinstance(node, dict):
        return None
    axes = {a: node.get(a) for a in "xyz"}
    free = [k for k in swept_keys(jobs) if k not in axes.values()]
    for a in "yz":
        if axes[a] is None and free:
            axes[a] = free.pop(0)
    return axes


def _axis_value(job: Job, rec: dict, key: str | None, swept: list[str]) -> str | None:
    """An image's value on an axis: the job's override for a setting swept across jobs, else the image's own
    record value for a batched setting (guidance_scales -> guidance_scale, strengths -> strength, ...)."""
    if key is None:
        return None
    if key not in swept:
        for k in (BATCHED.get(key), key, key[:-1] if key.endswith("s") else None):
            if k and k in rec:
                v = rec[k]
                return f"{v:g}" if isinstance(v, float) else str(v)
    return job.values().get(key, "-")


def xyz_grids(jobs: list[Job], out_dir: Path) -> list[Path]:
    """``experiment=xyz``: one labelled grid per z value (``xyz_<z>.png``, or ``xyz.png`` without z): rows =
    y values, columns = x values, cells = the images with those values (side by side when several)."""
    from PIL import Image

    from stablefused.outputs import grid

    axes = xyz_axes(jobs)
    if axes is None or not any(j.image_paths for j in jobs):
        return []
    swept = swept_keys(jobs)
    cells: dict[tuple, list[Path]] = {}
    for j in jobs:
        for rec, path in zip(j.image_records, j.image_paths):
            if path.is_file():
                cells.setdefault(tuple(_axis_value(j, rec, axes[a], swept) for a in "xyz"), []).append(path)
    xs, ys, zs = (list(dict.fromkeys(c[i] for c in cells)) for i in range(3))
    n = max(len(v) for v in cells.values())
    written = []
    for z in zs:
        tiles = []
        for y in ys:
            for x in xs:
                imgs = [Image.open(p).convert("RGB") for p in cells.get((x, y, z), [])]
                if not imgs:
                    tiles.append(None)
                    continue
                w, h = imgs[0].size
                tile = Image.new("RGB", (w * n, h), "white")
                for k, im in enumerate(imgs):
                    tile.paste(im, (k * w, 0))
                tiles.append(tile)
        if not any(tiles):
            continue
        label = lambda key, v: _wrap(f"{key}={v}" if key else "")  # noqa: E731
        img = grid(tiles, rows=len(ys), cols=len(xs), row_labels=[label(axes["y"], y) for y in ys],
                   col_labels=[label(axes["x"], x) for x in xs], title=f"{axes['z']}={z}" if axes["z"] else None)
        path = out_dir / (f"xyz_{_safe(str(z))}.png" if axes["z"] else "xyz.png")
        img.save(path)
        written.append(path)
    return written


def write_report(sweep_dir: str | Path, max_cells: int = 16) -> list[Job]:
    """Write summary.csv, report_grid.png, plots/ and report.md into ``sweep_dir``; return the jobs."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    header, rows = summary_rows(jobs)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    img = report_grid(jobs, max_cells)
    if img is not None:
        img.save(sweep_dir / "report_grid.png")
    plot_paths = plots(jobs, sweep_dir / "plots")
    xyz_paths = xyz_grids(jobs, sweep_dir)

    bad = [j for j in jobs if j.status != "ok"]
    common = [o for o in (jobs[0].overrides if jobs else []) if all(o in j.overrides for j in jobs)]
    md = [f"# Sweep report: {sweep_dir}", "",
          f"{len(jobs)} jobs, {len(jobs) - len(bad)} ok, {len(bad)} failed."]
    if common:
        md += ["", "Common overrides: " + " ".join(f"`{o}`" for o in common)]
    shown = [i for i, h in enumerate(header) if h != "overrides"]
    md += ["", "| " + " | ".join(header[i] for i in shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(_fmt(r[i]).replace("|", "\\|") for i in shown) + " |" for r in rows]
    if bad:
        md += ["", "## Failed jobs", ""] + [f"- #{j.name} ({j.label}): {j.status}: {j.reason}" for j in bad]
    if img is not None:
        md += ["", "## Images", "", "![one row per job](report_grid.png)"]
    if xyz_paths:
        md += ["", "## X/Y/Z", ""] + [f"![{p.stem}]({p.name})" for p in xyz_paths]
    if plot_paths:
        md += ["", "## Metrics vs swept values", ""] + [f"![{p.stem}](plots/{p.name})" for p in plot_paths]
    (sweep_dir / "report.md").write_text("\n".join(md) + "\n")
    return jobs


def main(argv: list[str]) -> int:
    """``python -m stablefused report DIR``: exit 0 if every job is ok, 1 if some failed, 2 on bad use."""
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m stablefused report <sweep dir>", file=sys.stderr)
        return 2
    d = Path(argv[0])
    if not d.is_dir():
        print(f"report: {d}: no such directory", file=sys.stderr)
        return 2
    jobs = write_report(d)
    if not jobs:
        print(f"report: {d}: no job dirs (sub-directories with .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    bad = [j for j in jobs if j.status != "ok"]
    print(f"{d / 'report.md'}: {len(jobs) - len(bad)}/{len(jobs)} jobs ok")
    for j in bad:
        print(f"  #{j.name} ({j.label}): {j.status}: {j.reason}")
    return 1 if bad else 0
