"""What every task shares: the :class:`Run` (run dir, sampler, plugins, manifest, W&B), the cell/batch
driver, image records, metric summaries, plots and W&B tables. Tasks (:mod:`stablefused.tasks`) build their
cells and say how to generate a batch; this module writes, scores and logs the results, once for all tasks.

Plugins never get the :class:`Run`: after sampling, recorders' ``save`` and visualizers get a
:class:`~stablefused.run_view.RunView` (settings, records, images, recorders, sampler, ``path``,
``add_artifact``); walkers get a :class:`~stablefused.walkers.WalkContext` from the walk task.

Plugin kinds used here, besides guidance (see :mod:`stablefused.guidance`):

* ``recorders``: hooks (:mod:`stablefused.hooks`) with an optional ``save(view: RunView) -> list[Path]``.
* ``metrics``: ``__call__(images: list[PIL.Image], records: list[dict]) -> list[dict[str, float]]``.
* ``visualizers``: ``__call__(view: RunView) -> list[Path]`` (register files with ``view.add_artifact``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from stablefused import registry, signals
from stablefused.guidance import Guidance
from stablefused.logger import NullLogger
from stablefused.models import Components
from stablefused.outputs import Manifest, grid, save_png, strict_json, to_uint8
from stablefused.pipeline import Generation, Sampler
from stablefused.plots import metric_lines
from stablefused.records import save_parts
from stablefused.scheduler_names import sampler_label
from stablefused.scores import METRICS_KEY, metric_keys

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
    done: dict[int, dict] = field(default_factory=dict)  # image records already on disk (a resumed run), by index
    failures: list[str] = field(default_factory=list)  # plugins that raised, one line each
    total: int = 0  # images the run will make (for progress and interrupt messages); generate() raises it
    # False: images are written and scored but neither kept in ``images`` nor logged one by one to W&B (long
    # walks: memory stays flat; the task logs its video instead)
    keep_images: bool = True
    refiner: Any = None  # model.refiner loaded (stablefused.families.sdxl.Refiner): txt2img batches hand over to it

    def __post_init__(self) -> None:
        from stablefused.records import restore_parts

        # a resumed run: the recorders get back the step records of the images it keeps; images whose records
        # are not all on disk are made again (same pixels), so records and visualizers come out whole
        again = restore_parts(self, set(self.done))
        if again:
            log.info("resuming: %d kept image(s) lack their step records; making them again", len(again))
            for i in again:
                self.done.pop(i, None)
            forget(self.run_dir, again)

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def pending(self, cells: Sequence[dict]) -> list[dict]:
        """The cells whose image is not on disk yet; the others are taken from disk (a resumed run)."""
        todo, kept = [], []
        for cell in cells:
            rec = self.done.get(cell["index"])
            if rec is None:
                todo.append(cell)
            else:
                self.records.append(rec)
                if self.keep_images:
                    kept.append((Image.open(self.run_dir / rec["path"]).convert("RGB"), rec))
                    self.images.append(kept[-1][0])
        if len(todo) < len(cells):
            log.info("resuming: %d of %d images already in %s", len(cells) - len(todo), len(cells), self.run_dir)
            self.log_images([k[0] for k in kept], [k[1] for k in kept])  # this W&B run gets them too
        return todo

    def generate(self, cells: Sequence[dict], make: Callable[[list[dict]], Generation],
                 record: Callable[[dict], dict] | None = None) -> dict:
        """Render ``cells`` (dicts with at least ``index``) in batches of ``batch_size``: ``make(chunk)`` runs
        the loop for a batch, each image is written at once and then scored. Returns the loop's compute
        counts for these cells (``unet_rows``, ``model_calls``, ``full_cfg_rows``, ``images``)."""
        record = record or (lambda cell: image_record(self, cell))
        compute = {"unet_rows": 0, "model_calls": 0, "full_cfg_rows": 0, "images": 0}
        self.total = max(self.total, max((c["index"] for c in cells), default=-1) + 1)
        todo = self.pending(cells)
        for chunk in batched(todo, int(self.cfg.batch_size)):
            gen = make(chunk)
            for ctx in gen.contexts:  # a base + refiner batch: both loops
                for k in self.stats:
                    self.stats[k] += ctx.stats[k]
                compute["unet_rows"] += ctx.stats["unet_rows"]
                compute["model_calls"] += ctx.stats["model_calls"]
                compute["full_cfg_rows"] += 2 * len(chunk) * len(ctx.timesteps)
            compute["images"] += len(chunk)
            self.add_images(gen.images, [record(c) for c in chunk])
            log.info("%d/%d images", len(self.records), self.total)
        if len(self.records) > 1:  # resumed, or several generate() calls: keep the records in index order
            order = sorted(range(len(self.records)), key=lambda i: self.records[i]["index"])
            self.records[:] = [self.records[i] for i in order]
            if self.keep_images:
                self.images[:] = [self.images[i] for i in order]
        return compute

    def add_images(self, images: np.ndarray, records: list[dict]) -> list[Image.Image]:
        """Write a freshly generated batch (float images in [0, 1]): each PNG (with its parameters) first,
        then the metrics' scores, then its manifest line, then the batch goes to W&B. A metric that raises is
        reported by name and the images and manifest stay complete; an interrupt waits for the batch."""
        pil = [Image.fromarray(a) for a in to_uint8(images)]
        with signals.critical():
            for img, rec in zip(pil, records):
                save_png(img, self.run_dir / rec["path"], rec)
            save_parts(self)  # the batch's step records, before its manifest lines (a resume trusts those)
            self.score(pil, records)
            for img, rec in zip(pil, records):
                self.manifest.append(rec)
                self.records.append(rec)
            if self.keep_images:
                self.images.extend(pil)
                self.log_images(pil, records)
        return pil

    def log_images(self, images: list[Image.Image], records: list[dict]) -> None:
        """Images to W&B in lists of at most 100 (W&B keeps at most 108 images per logged list)."""
        if self.logger.run is None:  # logger=none: skip building W&B objects
            return
        for i in range(0, len(images), 100):
            self.logger.images("images", images[i : i + 100], [self.caption(r) for r in records[i : i + 100]])

    @staticmethod
    def caption(rec: dict) -> str:
        """An image's W&B caption: prompt, seed, the task's own settings (strength, frame) and guidance."""
        own = "".join(f" | {k} {rec[k]:g}" for k in ("strength", "frame") if isinstance(rec.get(k), (int, float)))
        return f"{rec['prompt']} | seed {rec['seed']}{own} | guidance {rec['guidance_scale']:g}"

    def score(self, images: list[Image.Image], records: list[dict]) -> None:
        """Each metric's values into the records; ``metrics`` lists the keys they added (:mod:`stablefused.scores`)."""
        for rec in records:
            rec.setdefault(METRICS_KEY, [])
        for name, metric in self.metrics.items():
            try:
                values = metric(images, records)
            except Exception as e:  # a metric must never cost the images
                msg = f"metrics.{name} failed ({type(e).__name__}: {e}); images kept without its scores"
                if msg not in self.failures:
                    log.error("%s", msg)
                    self.failures.append(msg)
                continue
            for rec, vals in zip(records, values):
                rec.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                            for k, v in vals.items()})
                rec[METRICS_KEY] += [k for k in vals if k not in rec[METRICS_KEY]]

    def add_artifact(self, path: Path, kind: str, caption: str | None = None, log_key: str | None = None,
                     **extra: Any) -> None:
        """List ``path`` (under the run dir) in the manifest and log it to W&B (``kind``: image, video,
        plot, grid, strip, file)."""
        path = Path(path)
        rel = str(path.relative_to(self.run_dir))
        self.manifest.append({"type": kind, "path": rel, "caption": caption, **extra})
        key = log_key or path.stem
        if kind in ("image", "plot", "grid", "strip"):
            self.logger.image(key, Image.open(path).convert("RGB"), caption)
        elif kind == "video" and path.suffix in (".mp4", ".gif", ".webm"):
            self.logger.video(key, path, caption)

    def save_grid(self, cells: Sequence[Image.Image | None], rows: int, cols: int, row_labels: Sequence[str],
                  col_labels: Sequence[str], caption: str, filename: str = "grid.png") -> Path:
        path = self.path(filename)
        grid(cells, rows, cols, row_labels=row_labels, col_labels=col_labels).save(path)
        self.add_artifact(path, "grid", caption=caption, log_key=Path(filename).stem)
        return path


# ------------------------------------------------------------------------------------------- run dir
RUN_FILE = "run.json"
# Settings that change neither the images nor their records: a rerun that differs only in these continues.
NOT_OUTPUT = ("progress", "logger", "batch_size", "resume", "overwrite", "hydra", "xyz", "threads")


def fingerprint(cfg: DictConfig, task: Any = None) -> dict:
    """What a run's outputs depend on: its settings (less :data:`NOT_OUTPUT`) and the content of the ``task``'s
    input files (``inputs``: per setting, file -> sha256), so a changed source file is a changed run."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    fp = {k: v for k, v in plain.items() if k not in NOT_OUTPUT}
    model = fp.get("model") if isinstance(fp.get("model"), dict) else {}
    refiner = model.get("refiner")
    if isinstance(refiner, str) and refiner:  # the refiner's own config (its source), not only its name
        from stablefused.models import named_model_config

        try:
            fp["refiner_model"] = named_model_config(refiner, "model.refiner")
        except ValueError:  # validation names it
            pass
    elif refiner is None and "model" in fp:  # no refiner: its settings change nothing (and runs made before they existed match)
        fp["model"] = {k: v for k, v in model.items() if k not in ("refiner", "refiner_handover")}
    inputs = input_digests(cfg, task) if task is not None else {}
    if inputs:
        fp["inputs"] = inputs
    return fp


def input_digests(cfg: DictConfig, task: Any) -> dict[str, dict[str, str]]:
    """Per input-file setting of the task (``Task.input_settings``): {file: sha256 of its bytes} ("missing"
    for a file that is not there; validation names it)."""
    import hashlib

    out = {}
    for key in task.input_settings:
        files = {}
        for f in task.input_files(cfg, key):
            try:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                files[str(f)] = h.hexdigest()
            except OSError:
                files[str(f)] = "missing"
        if files:
            out[key] = files
    return out


def _changed_inputs(old: dict, new: dict) -> list[str]:
    """``key=file`` for every input file whose content (or presence) differs between two fingerprints."""
    a, b = old.get("inputs") or {}, new.get("inputs") or {}
    return [f"{k}={f}" for k in sorted(set(a) | set(b)) for f in sorted(set(a.get(k, {})) | set(b.get(k, {})))
            if a.get(k, {}).get(f) != b.get(k, {}).get(f)]


def open_run_dir(cfg: DictConfig, run_dir: Path, task: Any) -> dict[int, dict]:
    """Prepare ``run_dir`` for a run and return the image records already there (by index).

    An empty dir starts fresh. A dir holding this config's outputs (``run.json``) continues: its images are
    kept and only the missing ones are made (``resume=true``, the default). A dir holding another config's
    outputs is refused, naming the differing settings, unless ``overwrite=true``, which removes them.
    ``output_type``: the task's one record per cell index (:attr:`stablefused.tasks.Task.output_type`)."""
    from stablefused.errors import ConfigError

    manifest, meta = run_dir / "manifest.jsonl", run_dir / RUN_FILE
    fp = fingerprint(cfg, task)
    previous = _read_run_file(meta)
    has_outputs = manifest.is_file() and manifest.stat().st_size > 0
    done: dict[int, dict] = {}
    if has_outputs:  # a run.json without outputs is a start that failed early: nothing to keep
        if cfg.overwrite and not _owned(previous):
            raise ConfigError(f"overwrite=true: {run_dir} holds files StableFused did not write (no run.json of "
                              "its own), so nothing there is removed; use a new run dir (hydra.run.dir=...)")
        if cfg.overwrite:
            _remove_outputs(run_dir)
        elif previous is None or previous.get("config") != fp:
            old = previous.get("config", {}) if previous else {}
            changed = _changed_inputs(old, fp) if previous else []
            if changed and {k: v for k, v in old.items() if k != "inputs"} == \
                    {k: v for k, v in fp.items() if k != "inputs"}:
                raise ConfigError(f"hydra.run.dir={run_dir}: holds outputs made from another version of "
                                  f"{', '.join(changed)} (its content changed since); use a new run dir, or "
                                  "overwrite=true to make them again from the file as it is now")
            diff = _differences(old, fp)
            what = f"another config ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})" if previous else \
                "outputs of an unknown run"
            raise ConfigError(f"hydra.run.dir={run_dir}: holds {what}; use a new run dir, or overwrite=true to "
                              "replace them")
        elif not cfg.resume:
            raise ConfigError(f"resume=false: {run_dir} already holds this run's outputs; use a new run dir, "
                              "resume=true to continue it, or overwrite=true to start again")
        else:
            done = _keep_images(run_dir, task.output_type)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(strict_json({"written_by": OWNER, "config": fp}))
    tmp.replace(meta)
    return done


class RunLock:
    """One owner per run dir: ``run.lock`` holds the owner's pid, host, process start time and cluster job id.
    A second run into a dir a live run holds is refused in one line. A lock left by a killed run does not
    block: it is taken over when its owner is on this host and its process is gone (or the pid now belongs to
    a later process), or when it was taken by this same cluster job (``SLURM_JOB_ID``: a requeued job, maybe
    on another node). Re-entrant within a process (the command line and :func:`stablefused.app.run` both
    take it)."""

    NAME = "run.lock"
    _held: dict[str, int] = {}  # lock path -> depth, in this process

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME

    @staticmethod
    def _proc_start(pid: int) -> str | None:
        try:  # field 22 of /proc/<pid>/stat: start time in clock ticks since boot (Linux)
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None

    def _me(self) -> dict:
        import os
        import socket
        import time

        return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": self._proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def _stale(self, owner: dict) -> bool:
        import os
        import socket

        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job:
            return True  # this job, requeued: the earlier attempt is gone
        if owner.get("host") != socket.gethostname():
            return False  # another machine: cannot tell, so it is live
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        start = owner.get("proc_start")
        return start is not None and self._proc_start(pid) not in (None, start)  # pid reused by another process

    def acquire(self) -> "RunLock":
        import os

        from stablefused.errors import ConfigError

        key = str(self.path.resolve())
        if self._held.get(key):
            self._held[key] += 1
            return self
        me = json.dumps(self._me())
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}  # empty or cut short: its writer died before finishing it
                if not isinstance(owner, dict) or not owner or self._stale(owner):
                    log.warning("run dir %s: taking over the lock of a run that is gone (%s)", self.path.parent,
                                _owner_text(owner) if isinstance(owner, dict) and owner else "unreadable lock")
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(f"hydra.run.dir={self.path.parent}: in use by a live run ({_owner_text(owner)}); "
                                  f"wait for it to end or use another run dir (if that run is gone, delete "
                                  f"{self.path})") from None
            except OSError as e:  # not a folder, read-only, no permission, ...
                raise ConfigError(f"hydra.run.dir={self.path.parent}: cannot write there ({e.strerror or e}); "
                                  "use a writable folder") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._held[key] = 1
            return self

    def release(self) -> None:
        key = str(self.path.resolve())
        depth = self._held.get(key, 0)
        if depth > 1:
            self._held[key] = depth - 1
            return
        if depth == 1:
            del self._held[key]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owner_text(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}{job}"


# run.json's mark: the dir's outputs were written by StableFused (overwrite=true removes nothing without it)
OWNER = "stablefused"


def _read_run_file(meta: Path) -> dict | None:
    """run.json as a dict, or None (absent, unreadable or not JSON: nobody's run as far as we can tell)."""
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _owned(previous: dict | None) -> bool:
    return bool(previous) and previous.get("written_by") == OWNER and isinstance(previous.get("config"), dict)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


# Records that belong to the image record of the same ``index`` (a video's frames, MP4 and frame strip), written
# before it: a resumed run keeps them with their image, and drops those of an image that was never written.
PART_TYPES = ("frame", "video", "strip")


def _keep_images(run_dir: Path, output_type: str = "image") -> dict[int, dict]:
    """The output records (``output_type``: the task's one record per index, e.g. a walk's ``frame``) of an
    interrupted run whose file exists (last record per index wins), with their parts (:data:`PART_TYPES`);
    the manifest is rewritten to hold just those, so the continued run adds no duplicate lines."""
    manifest = run_dir / "manifest.jsonl"
    done: dict[int, dict] = {}
    parts: dict[int, dict[str, dict]] = defaultdict(dict)
    if manifest.is_file():
        for rec in read_records(manifest):
            if "index" not in rec or not (run_dir / rec.get("path", "")).is_file():
                continue  # artifacts (grids, plots) are made again
            if rec.get("type") == output_type:
                done[int(rec["index"])] = rec
            elif rec.get("type") in PART_TYPES:
                parts[int(rec["index"])][rec["path"]] = rec
    broken = {i for i in done if not all(decodes(run_dir / r["path"]) for r in (done[i], *parts[i].values()))}
    if broken:
        log.warning("resuming: %d kept output(s) do not decode (cut short?) and are made again: %s", len(broken),
                    ", ".join(done[i]["path"] for i in sorted(broken)[:5]) + (", ..." if len(broken) > 5 else ""))
        for i in broken:
            del done[i]
    kept = [r for i in sorted(done) for r in (*parts[i].values(), done[i])]
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(manifest)
    return done


def decodes(path: Path) -> bool:
    """Whether an output file really decodes: an image fully (a truncated or empty PNG fails), a video by
    reading it through to the end with ffmpeg; other files: not empty."""
    try:
        if path.stat().st_size == 0:
            return False
        if path.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv"):
            import imageio_ffmpeg

            return imageio_ffmpeg.count_frames_and_secs(str(path))[0] > 0
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
            with Image.open(path) as img:
                img.load()
        return True
    except Exception:
        return False


def forget(run_dir: Path, indices: set[int]) -> None:
    """Drop the output records (and their parts) of ``indices`` from the manifest: they are made again."""
    manifest = run_dir / "manifest.jsonl"
    kept = [r for r in read_records(manifest) if not ("index" in r and int(r["index"]) in indices)]
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(manifest)


def read_records(manifest: Path) -> list[dict]:
    """The manifest's records, skipping a line cut short by a killed process (the next run rewrites it)."""
    out = []
    for line in manifest.read_text().splitlines() if manifest.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def is_complete(cfg: DictConfig, run_dir: Path, task: Any) -> bool:
    """Whether ``run_dir`` holds this config's finished run: same ``run.json`` config, the manifest's final
    ``run`` record written, and every file the manifest lists on disk (a rerun would have nothing to do)."""
    previous = _read_run_file(run_dir / RUN_FILE)
    if previous is None or previous.get("config") != fingerprint(cfg, task):
        return False
    recs = read_records(run_dir / "manifest.jsonl")
    return bool(recs) and recs[-1].get("type") == "run" and all(
        (run_dir / r["path"]).is_file() for r in recs if r.get("path"))


def _remove_outputs(run_dir: Path) -> None:
    """``overwrite=true`` on a dir StableFused wrote (run.json marked, see :func:`open_run_dir`): remove the
    files its manifest lists (inside the dir), the step-record parts, the manifest and run.json, and the
    folders those leave empty. Nothing else: a file the user put there stays."""
    from stablefused.records import PARTS_DIR

    root = run_dir.resolve()
    manifest = run_dir / "manifest.jsonl"
    paths = [run_dir / r["path"] for r in read_records(manifest) if isinstance(r.get("path"), str)]
    paths += sorted((run_dir / PARTS_DIR).glob("*/*.safetensors"))
    for p in paths:
        if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(root):
            p.unlink()
    for p in {q.parent for q in paths}:  # the folders that held them, when now empty (images/, frames/, ...)
        while p.resolve() != root and p.resolve().is_relative_to(root) and p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            p = p.parent
    manifest.unlink(missing_ok=True)
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    log.warning("overwrite=true: removed the previous outputs in %s", run_dir)


def make_plugins(cfg: DictConfig, kind: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plugins of ``kind`` that ``cfg`` selects, in its order; those in ``given`` (by name, objects the
    Python API was handed) are used as they are instead of being built from their parameters."""
    given = given or {}
    return {name: given[name] if name in given else registry.create(kind, name, **params)
            for name, params in registry.selected(cfg, kind, warn=True).items()}


# ------------------------------------------------------------------------------------------- cells
def prompt_seed_rows(cfg: DictConfig) -> list[tuple[str, int]]:
    """The grid rows of a run: (prompt, seed) pairs, every prompt with every seed or zipped (``combine``)."""
    prompts = list(cfg.prompts or cfg.model.example_prompts)
    seeds = [int(s) for s in cfg.seeds]
    if cfg.combine == "zip":
        return list(zip(prompts, seeds))
    return list(itertools.product(prompts, seeds))


def image_size(cfg: DictConfig) -> tuple[int, int]:
    return int(cfg.height or cfg.model.height), int(cfg.width or cfg.model.width)


def batched(items: Sequence, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


def wrap(text: str, width: int = 28) -> str:
    return "\n".join(line for part in text.split("\n") for line in textwrap.wrap(part, width) or [""])


def row_label(prompt: str, seed: int) -> str:
    return wrap(f"{prompt}\nseed {seed}")


def image_record(run: Run, cell: dict) -> dict:
    """The manifest record of one image: how it was made (the run's settings) plus the cell's own keys
    (``index``, ``row``, ``col``, ``prompt``, ``seed``, ``guidance_scale`` and whatever the task adds)."""
    cfg = run.cfg
    height, width = cell.get("height"), cell.get("width")
    if height is None:
        height, width = image_size(cfg)
    rec = {
        "type": "image",
        "path": f"images/{cell['index']:04d}_r{cell.get('row', 0)}_c{cell.get('col', 0)}_s{cell['seed']}.png",
        "task": cfg.task, "negative_prompt": cfg.negative_prompt, "steps": int(cfg.steps),
        "scheduler": cfg.scheduler.name, "sampler": sampler_label(run.sampler.scheduler),
        "scheduler_class": type(run.sampler.scheduler).__name__,
        "model": cfg.model.name, "height": height, "width": width,
        "guidance_schedule": cfg.guidance.schedule, "guidance_rule": cfg.guidance.rule,
    }
    if run.refiner is not None:  # base + refiner: which refiner, where it took over
        rec.update(run.refiner.record())
    rec.update(cell)
    return rec


# ------------------------------------------------------------------------------------------- metrics
def means(records: list[dict]) -> dict[str, float]:
    """Mean of every metric over ``records`` (None values skipped; NaN when none has a value)."""
    out = {}
    for m in metric_keys(records):
        vals = [r[m] for r in records if r.get(m) is not None]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out


def summarise_by(records: list[dict], key: str) -> dict[Any, dict[str, float]]:
    """Mean of every metric per value of ``key``."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    return {value: means(recs) for value, recs in sorted(groups.items())}


def summarise_metrics(run: Run, key: str = "guidance_scale", label: str = "guidance scale",
                      filename: str = "metrics_by_guidance") -> dict[Any, dict[str, float]]:
    """Mean metrics per value of ``key``: a JSON file, a W&B table and summary, and a plot when ``key`` takes
    more than one value."""
    mkeys = metric_keys(run.records)
    if not mkeys:
        return {}
    summary = summarise_by(run.records, key)
    path = run.path(f"{filename}.json")
    path.write_text(strict_json({str(g): v for g, v in summary.items()}))
    run.add_artifact(path, "file", caption=f"mean metrics per {label}")
    run.logger.table(filename, [key, "metric", "value"], [[g, m, v] for g, vals in summary.items() for m, v in vals.items()])
    run.logger.summary({f"{m}@{g:g}" if isinstance(g, float) else f"{m}@{g}": v
                        for g, vals in summary.items() for m, v in vals.items()})
    if len(summary) > 1:
        plot_name = "adherence.png" if key == "guidance_scale" else f"{filename}.png"
        plot = metric_lines(summary, run.path(plot_name), title=f"{run.cfg.model.name}: metrics vs {label}",
                            xlabel=label)
        run.add_artifact(plot, "plot", caption=f"mean metric per {label}", log_key=Path(plot_name).stem)
        for m in mkeys:
            run.logger.line_plot(f"{m}_vs_{key}", [key, m], [[g, vals[m]] for g, vals in summary.items()], key, m,
                                 title=f"{m} vs {label}")
    return summary


# ------------------------------------------------------------------------------------------- W&B
def log_samples_table(run: Run, columns: Sequence[str] = ("prompt", "seed", "guidance_scale")) -> None:
    """The per-image W&B table: the image, the given record keys and every metric."""
    if run.logger.run is None:
        return
    mkeys = metric_keys(run.records)
    cols = ["image", *columns, *mkeys]
    rows = [[img, *[r.get(k) for k in columns], *[r.get(k) for k in mkeys]] for img, r in zip(run.images, run.records)]
    run.logger.table("samples", cols, rows)
