"""Sweeps (``python -m stablefused -m ...``): a status file per job, the launcher-plugin check, and the
callback that ends a sweep with its report and a non-zero exit code when a job failed.

Everything here talks to the runs through files only (``status.json``, ``manifest.jsonl``, ``.hydra/``), so
it works the same whichever launcher ran the jobs and in whichever process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

STATUS = "status.json"

# hydra/launcher=<name> -> (plugin module under hydra_plugins, pyproject extra, PyPI package)
LAUNCHERS = {
    "submitit_local": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "slurm_gpu": ("hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "joblib": ("hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "ray": ("hydra_ray_launcher", "ray", "hydra-ray-launcher"),
    "ray_aws": ("hydra_ray_launcher", "ray", "hydra-ray-launcher"),
}


def missing_launcher(argv: list[str]) -> str | None:
    """One line naming the ``pip install`` to run when ``hydra/launcher=NAME`` on the command line needs a
    plugin that is not installed (Hydra's own error is a long "Could not find 'hydra/launcher/NAME'")."""
    for arg in argv:
        if arg.startswith("hydra/launcher="):
            name = arg.split("=", 1)[1]
            if name in LAUNCHERS:
                module, extra, package = LAUNCHERS[name]
                if importlib.util.find_spec(f"hydra_plugins.{module}") is None:
                    return (f"hydra/launcher={name}: the {package} plugin is not installed; "
                            f"pip install -e '.[{extra}]' (or pip install {package})")
    return None


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class JobStatus:
    """``status.json`` in a job dir: ``running`` when the job starts (so a job killed from outside shows as
    not finished), then ``ok`` or ``failed`` with a one-line reason, wall time and what the run reported."""

    def __init__(self, run_dir: Path, job: Any = None, overrides: list[str] | None = None, group: str | None = None):
        self.path = Path(run_dir) / STATUS
        self.start = time.perf_counter()
        self.data = {"status": "running", "job": job, "overrides": list(overrides or []), "group": group,
                     "pid": os.getpid(),
                     "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write(self.path, self.data)

    def _finish(self, status: str, **extra: Any) -> dict:
        self.data.update(status=status, wall_s=round(time.perf_counter() - self.start, 3), **extra)
        _write(self.path, self.data)
        return self.data

    def ok(self, run: Any = None) -> dict:
        stats = dict(getattr(run, "stats", None) or {})
        extra = {k: stats[k] for k in ("unet_rows", "model_calls") if k in stats}
        records = getattr(run, "records", None)
        if records is not None:
            extra["images"] = len(records)
        return self._finish("ok", reason=None, **extra)

    def failed(self, error: BaseException, with_traceback: bool = False) -> dict:
        reason = " ".join(str(error).split()) or type(error).__name__
        extra = {"error_type": type(error).__name__}
        if with_traceback:
            extra["traceback"] = "".join(traceback.format_exception(error))
        return self._finish("failed", reason=reason, **extra)


def read_status(run_dir: Path) -> dict:
    """A job dir's ``status.json`` ({} when there is none or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def finished(cfg: Any, run_dir: Path) -> dict | None:
    """``resume=true`` (not ``overwrite``): the status of a job that already finished in ``run_dir`` (status
    ``ok`` and a complete run dir, :func:`stablefused.runs.is_complete`), so a rerun of the sweep skips it
    without loading the model; None when there is work to do (a killed or failed job continues instead)."""
    from stablefused.runs import is_complete

    path = Path(run_dir) / STATUS
    if not cfg.get("resume") or cfg.get("overwrite") or not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if status.get("status") != "ok":
        return None
    from stablefused.errors import ConfigError
    from stablefused.tasks import get_task

    try:
        task = get_task(cfg.task)
    except ConfigError:
        return None
    return status if is_complete(cfg, Path(run_dir), task) else None


class SweepReport(Callback):
    """Registered in conf/config.yaml under ``hydra.callbacks``. At the end of a multirun (in the process
    that launched it, whatever the launcher) it writes the sweep report and exits non-zero naming the jobs
    that failed. Hydra turns an exception in a callback into a warning, so this exits with SystemExit."""

    def __init__(self, report: bool = True, exit_code: int = 1):
        self.report = report
        self.exit_code = exit_code

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from stablefused import report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            jobs = report.write_report(sweep_dir) if self.report else report.collect(sweep_dir)
        except Exception as e:  # a broken report must not pass for a good sweep
            traceback.print_exc()
            print(f"[stablefused] ERROR sweep report for {sweep_dir} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            sys.exit(self.exit_code)
        if self.report and jobs and config.get("logger", {}).get("name") == "wandb":
            try:
                log_to_wandb(config.logger, sweep_dir, jobs)
            except Exception as e:  # the files on disk are the report; W&B is a copy
                print(f"[stablefused] WARNING sweep report not logged to W&B: {type(e).__name__}: {e}",
                      file=sys.stderr)
        bad = [j for j in jobs if j.status != "ok"]
        where = f"; report: {sweep_dir / 'report.md'}" if self.report else ""
        print(f"[stablefused] sweep {sweep_dir}: {len(jobs) - len(bad)}/{len(jobs)} jobs ok{where}",
              file=sys.stderr)
        if bad:
            names = "; ".join(f"#{j.name} ({j.label}): {j.status}: {j.reason}" for j in bad)
            print(f"[stablefused] ERROR {len(bad)} of {len(jobs)} sweep jobs failed: {names}", file=sys.stderr)
            sys.exit(self.exit_code)


def log_to_wandb(logger_cfg: Any, sweep_dir: Path, jobs: list) -> Any:
    """Log the report (summary table, report grid, plots) as one W&B run, job_type ``sweep_report``, in
    the group the sweep's jobs used (from their status.json). Returns the run's id."""
    from PIL import Image

    from stablefused import report
    from stablefused.logger import WandbLogger

    groups = [json.loads((j.dir / STATUS).read_text()).get("group") for j in jobs if (j.dir / STATUS).is_file()]
    group = next((g for g in groups if g), None)
    header, rows = report.summary_rows(jobs)
    logger = WandbLogger(logger_cfg, {"sweep_dir": str(sweep_dir), "jobs": len(jobs)}, sweep_dir,
                         name=f"{group or sweep_dir.name}/report", group=group, job_type="sweep_report")
    run_id = logger.run.id
    ok = False
    try:
        logger.table("sweep_summary", header, rows)
        if (sweep_dir / "report_grid.png").is_file():
            logger.image("report_grid", Image.open(sweep_dir / "report_grid.png").convert("RGB"))
        for p in sorted(sweep_dir.glob("xyz*.png")):
            logger.image(p.stem, Image.open(p).convert("RGB"))
        for p in sorted((sweep_dir / "plots").glob("*.png")):
            logger.image(f"plots/{p.stem}", Image.open(p).convert("RGB"))
        bad = [j for j in jobs if j.status != "ok"]
        logger.summary({"jobs": len(jobs), "jobs_ok": len(jobs) - len(bad), "jobs_failed": len(bad)})
        ok = True
    finally:
        logger.finish(exit_code=0 if ok else 1)
    return run_id
