"""Checks Hydra's own steps need before a run starts, and the CPU share of parallel sweep jobs.

* :class:`Preflight` (a Hydra callback, ``hydra.callbacks.preflight`` in conf/config.yaml): before Hydra makes
  the run dir (``on_run_start``) or the sweep dir (``on_multirun_start``), check that it can: an empty value,
  an existing file, a path below a file, an unwritable folder or a read-only mount, a full disk are each one
  line (exit 2) instead of Hydra's traceback. A multirun also decides each job's CPU threads there.
* :func:`disk_full_line`: the one line for a run that hits a full disk midway (what was kept).
* :func:`job_threads` / :func:`apply_threads`: parallel sweep jobs on one machine (joblib, submitit local)
  share its cores: each gets ``cores // jobs running at once`` threads (at least 1) through
  ``STABLEFUSED_THREADS`` and ``OMP_NUM_THREADS``, which the job processes inherit; ``threads=N`` sets it for
  one run.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
MIN_FREE_BYTES = 64 << 10  # below this a run cannot even write its config files
THREADS_ENV = "STABLEFUSED_THREADS"


def dir_problem(value: Any, key: str) -> str | None:
    """Why ``value`` cannot be (made into) a run dir, as one line naming ``key``; None when it can. Creates
    nothing: it probes the nearest existing folder with a temporary folder of its own."""
    text = "" if value is None else str(value)
    if not text.strip():
        return f"{key}='': empty; give a folder for the outputs, e.g. {key}=runs/my_run"
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        return f"{key}={text}: is a file, not a folder; choose another {key}"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={text}: {existing} is a file, not a folder; choose another {key}"
    try:
        probe = tempfile.mkdtemp(prefix=".stablefused-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or type(e).__name__).lower()
        return f"{key}={text}: cannot write in {existing} ({why}); choose a writable folder with {key}=..."
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"{key}={text}: no space left on {existing} ({free // 1024} KiB free); free some space or choose " \
               f"another {key}"
    return None


def disk_full_line(error: OSError, run_dir: Path) -> str:
    """One line for a run stopped by a full disk (or a quota, or a file grown too large): the path it could
    not write and what is kept (every image the manifest lists is complete; a rerun continues from there)."""
    kept = 0
    manifest = Path(run_dir) / "manifest.jsonl"
    try:
        kept = sum(1 for line in manifest.read_text().splitlines() if '"path"' in line)
    except OSError:
        pass
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large", errno.EROFS: "read-only file system"}.get(error.errno, error.strerror)
    where = error.filename or run_dir
    return (f"{where}: {what}; kept {kept} complete output(s) listed in {manifest} (a partly written file is "
            "not listed); free some space and rerun the same command to continue")


# ------------------------------------------------------------------------------------------- threads
def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def sweep_size(config: Any) -> int | None:
    """How many jobs the basic sweeper makes of this command line (product of the sweep values), or None."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        n = 1
        for o in parsed:
            if o.is_sweep_override():
                n *= sum(1 for _ in o.sweep_iterator())
        return n
    except Exception:
        return None


def concurrent_jobs(config: Any) -> int:
    """Jobs of a multirun that run at once on this machine: joblib's ``n_jobs``, submitit local's array
    parallelism (both capped by the number of jobs); 1 for the basic launcher (jobs one after another)."""
    launcher = config.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    jobs = sweep_size(config)
    if "joblib" in target.lower():
        n = launcher.get("n_jobs", -1)
        n = cores() if n is None or n < 0 else n
    elif "submitit" in target.lower() and "Local" in target:
        n = launcher.get("array_parallelism", 256) or 256
    else:
        return 1
    return max(1, min(int(n), jobs) if jobs else int(n))


def job_threads(concurrent: int, total_cores: int | None = None) -> int:
    return max(1, (total_cores or cores()) // max(1, concurrent))


def apply_threads(threads: int | None) -> int | None:
    """Set torch's CPU threads for this process: ``threads`` (the ``threads`` setting), else the share a
    parallel sweep gave its jobs (``STABLEFUSED_THREADS``); nothing when neither is set."""
    n = threads or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV, "").isdigit() else None)
    if n:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n


class Preflight(Callback):
    """Registered in conf/config.yaml under ``hydra.callbacks``; see the module doc."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _refuse(dir_problem(_select(config, "hydra.run.dir"), "hydra.run.dir"))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _refuse(dir_problem(_select(config, "hydra.sweep.dir"), "hydra.sweep.dir"))
        n = concurrent_jobs(config)
        if n > 1 and not os.environ.get(THREADS_ENV):
            share = job_threads(n)
            os.environ[THREADS_ENV] = str(share)  # inherited by the launcher's job processes
            os.environ["OMP_NUM_THREADS"] = str(share)
            os.environ["MKL_NUM_THREADS"] = str(share)
            print(f"[stablefused] {n} jobs at once on {cores()} cores: {share} thread(s) each", file=sys.stderr)


def _select(config: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(config, key)
    except Exception:
        return OmegaConf.select(config, key, throw_on_resolution_failure=False)


def _refuse(problem: str | None) -> None:
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


__all__ = ["Preflight", "dir_problem", "disk_full_line", "job_threads", "apply_threads", "concurrent_jobs",
           "DISK_ERRNOS"]
