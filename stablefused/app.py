"""``python -m stablefused``: compose the config, check it, load the model (cached across sweep jobs), run
the experiment, write the run dir and the W&B run."""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, Union
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stablefused import signals
from stablefused.config import ConfigError, literal_overrides, renamed, validate
from stablefused.errors import USER_ERRORS, PluginError
from stablefused.families.sdxl import REFINER_KEYS, load_refiner
from stablefused.guidance import Guidance
from stablefused.logger import make_logger, resolve_mode
from stablefused.models import load_components
from stablefused.outputs import Manifest
from stablefused.paths import config_dir
from stablefused.pipeline import Sampler
from stablefused.preflight import DISK_ERRNOS, apply_threads, disk_full_line
from stablefused.run_view import RunView
from stablefused.runs import Run, RunLock, make_plugins, open_run_dir
from stablefused.sweeps import STATUS, JobStatus, finished, missing_launcher, read_status
from stablefused.tasks import get_task

log = logging.getLogger("stablefused")


def run(cfg: DictConfig, run_dir: Path, group: str | None = None, given: dict[str, Any] | None = None) -> Run:
    """One StableFused run into ``run_dir``. Plugins, scheduler and logger are created fresh here, so
    nothing of one sweep job leaks into the next; only the loaded model modules are shared.

    ``given`` (the Python API, :func:`stablefused.api.run`): plugin objects the caller built, used instead of
    building them from ``cfg``: ``{"recorders": {name: obj}, "metrics": ..., "visualizers": ...,
    "guidance": Guidance}``. ``cfg`` still names them (with their parameters), so validation, the run dir's
    config and the records are the same as for the CLI."""
    with RunLock(run_dir):  # one owner per run dir (re-entrant: run_job holds it already)
        return _start(cfg, run_dir, group, given or {})


def _start(cfg: DictConfig, run_dir: Path, group: str | None, given: dict[str, Any]) -> Run:
    start = time.perf_counter()
    with signals.installed():  # an interrupt from here on (model load included) is one line, 130/143
        try:
            validate(cfg)
            apply_threads(cfg.get("threads"))
            if cfg.logger.name == "wandb" and (note := resolve_mode(cfg.logger)[1]):
                log.warning("%s", note)
            task = get_task(cfg.task)
            done = open_run_dir(cfg, run_dir, task)  # refuses another config's outputs; keeps this config's (resume)
            # Plugins first: one that cannot start (e.g. a metric without its weights) fails before the model loads.
            plugins = {kind: make_plugins(cfg, kind, given.get(kind)) for kind in ("recorders", "metrics", "visualizers")}
            guidance = given.get("guidance") or Guidance.from_config(cfg.guidance)
            components = load_components(cfg.model, cfg.device, cfg.dtype)
            unsupported = components.family.unsupported(cfg)  # a hub model's family is known only now
            if unsupported:
                raise ConfigError("\n".join(unsupported))
            scheduler = components.make_scheduler(cfg.scheduler.get("cls"), **(cfg.scheduler.get("overrides") or {}))
            refiner = load_refiner(cfg, components, scheduler)  # model.refiner (SDXL), after the base: None unset
            logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), run_dir,
                                 name=f"{cfg.name}/{run_dir.name}", group=group, job_type=cfg.name)
        except signals.Interrupted as e:
            log.error("interrupted (%s) while starting (checks, model load), before any new image; run dir %s",
                      e, run_dir)
            raise
        return _run(cfg, run_dir, task, done, plugins, guidance, components, scheduler, logger, start, refiner)


def _run(cfg: DictConfig, run_dir: Path, task: Any, done: dict, plugins: dict, guidance: Guidance, components: Any,
         scheduler: Any, logger: Any, start: float, refiner: Any = None) -> Run:
    r = Run(
        cfg=cfg, run_dir=run_dir, components=components, sampler=Sampler(components, scheduler),
        guidance=guidance, logger=logger, manifest=Manifest(run_dir / "manifest.jsonl"), done=done, refiner=refiner,
        **plugins,
    )
    ok = False
    try:
        _run_task(task, r)  # under run()'s signal handlers
        r.manifest.append(run_record(r, time.perf_counter() - start))
        ok = not r.failures
    except signals.Interrupted as e:
        log.error("interrupted (%s) after %d of %d images; outputs in %s", e, len(r.records),
                  max(r.total, len(r.records)), run_dir)
        logger.finish(exit_code=e.exit_code)
        raise
    finally:
        logger.finish(exit_code=0 if ok else 1)
    log.info("run dir: %s (%d images)", run_dir, len(r.records))
    if r.failures:
        raise PluginError(f"{len(r.failures)} plugin(s) failed, images and manifest are complete in {run_dir}: "
                          + "; ".join(r.failures))
    return r


def _run_task(task: Any, r: Run) -> None:
    """The task, then the recorders' files and the visualizers, each given the run's :class:`RunView` (not
    the run): one that fails is reported by name and the others still run."""
    task.run(r)
    view = RunView(r)
    steps = [(f"recorders.{n}", rec.save) for n, rec in r.recorders.items() if hasattr(rec, "save")]
    steps += [(f"visualizers.{n}", vis) for n, vis in r.visualizers.items()]
    for where, step in steps:
        try:
            step(view)
        except Exception as e:
            msg = f"{where} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            log.error("%s", msg)
            r.failures.append(msg)
    r.logger.summary({"unet_rows": r.stats["unet_rows"], "model_calls": r.stats["model_calls"],
                          "images": len(r.records)})


def run_record(r: Run, wall_s: float) -> dict:
    """The manifest's last record: what this run computed (a resumed run counts only its own work; ``kept``
    images were on disk already) and its wall time. Its presence says the run got to the end."""
    return {"type": "run", "unet_rows": r.stats["unet_rows"], "model_calls": r.stats["model_calls"],
            "images": len(r.records), "kept": len(r.done), "wall_s": round(wall_s, 3)}


def run_job(cfg: DictConfig, run_dir: Path, *, job: Any = None, overrides: list[str] | None = None,
            group: str | None = None, traceback: bool = False,
            given: dict[str, Any] | None = None) -> tuple[dict, Run | None]:
    """One job as ``python -m stablefused`` runs it, for the CLI and :func:`stablefused.api.run` alike: the run
    dir's lock first (another live run owning it is refused in one line and its ``status.json`` left alone); a
    run dir that already holds this config's finished run is skipped (``(status, None)``); otherwise
    ``status.json`` says ``running``, then :func:`run`, then ``ok`` (``(status, run)``). An exception is
    written to ``status.json`` (its traceback too when ``traceback`` and it is not a user error) and raised."""
    with RunLock(run_dir):  # before anything reads or writes the dir
        if (done := finished(cfg, run_dir)) is not None:
            log.info("%s is complete (status.json ok, same config, every file there): skipped; overwrite=true "
                     "makes it again", run_dir)
            return done, None
        status = JobStatus(run_dir, job=job, overrides=overrides, group=group)
        try:
            r = run(cfg, run_dir, group=group, given=given)
        except (Exception, signals.Interrupted) as e:  # Interrupted is a BaseException, as KeyboardInterrupt
            user = isinstance(e, (signals.Interrupted, *USER_ERRORS))
            try:
                status.failed(e, with_traceback=traceback and not user)
            except OSError:  # a full disk: the failure is still raised and reported
                pass
            raise
        return status.ok(r), r


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = None
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        group = f"{cfg.name}-{Path(hc.sweep.dir).name}"
        log.info("sweep job %s", hc.job.get("num"))
    failed = f"job {hc.job.num} failed: " if multirun else ""
    try:
        return run_job(cfg, run_dir, job=hc.job.get("num"),
                       overrides=OmegaConf.to_container(hc.overrides.task, resolve=False), group=group,
                       traceback=multirun)[0]
    except signals.Interrupted as e:
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        log.error("%s%s", failed, e)
        if not multirun:
            sys.exit(2)
        return {"status": "failed", "reason": str(e)}  # (a lock refused: the owner's status.json is its own)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:  # a full disk midway: one line, what was kept
            log.error("%s%s", failed, disk_full_line(e, run_dir))
            if not multirun:
                sys.exit(2)
        elif not multirun:
            raise
        else:  # a sweep runs every job: the failure is logged (one line), kept in status.json with its
            # traceback, and reported by the SweepReport callback, which makes the sweep exit non-zero
            log.error("%sjob %s: %s (traceback in %s)", failed, type(e).__name__, e, run_dir / STATUS)
    return read_status(run_dir) if (run_dir / STATUS).is_file() else {"status": "failed"}


@functools.lru_cache(maxsize=8)
def _top_level_keys(files: tuple[tuple[Path, int], ...]) -> frozenset[str]:
    """The top-level keys of the config files (with their mtimes: an edited file is read again); cached, as
    the Python API checks overrides on every call."""
    from omegaconf import OmegaConf

    return frozenset(k for f, _ in files for k in OmegaConf.load(f).keys() if k != "defaults")


def override_problems(args: list[str]) -> list[str]:
    """Cheap checks of command-line overrides before Hydra composes anything, so that a misspelt setting or
    option gets one line with the closest names instead of Hydra's advice: ``key=value`` whose top-level key
    is neither a setting (conf/config.yaml, any conf/task/*.yaml) nor a config group, and ``group=option``
    whose option has no conf/<group>/<option>.yaml. ``+``/``~`` overrides, ``hydra...``, packages (``@``) and
    sweeps written as functions (``choice(...)``) are left to Hydra."""
    import difflib

    if any(a.split("=")[0] in ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir") for a in args):
        return []  # another primary config: nothing here applies
    from stablefused.config import LOGGER_TYPES, declared_types, task_keys, type_problems

    conf = config_dir()
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    files = [conf / "config.yaml", *(conf / "task").glob("*.yaml"), *(conf / "experiment").glob("*.yaml")]
    known = _top_level_keys(tuple((f, f.stat().st_mtime_ns) for f in sorted(files))) | groups | {"hydra"}
    tasks = sorted(p.stem for p in (conf / "task").glob("*.yaml"))
    owned = {t: task_keys(t) for t in tasks}
    core = _top_level_keys(((conf / "config.yaml", (conf / "config.yaml").stat().st_mtime_ns),))
    chosen = selected_tasks(args)
    typed = {**declared_types(chosen[0] if len(chosen) == 1 else None), "plugin_dirs": Union[str, list, None]}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "@" in key or key.startswith("hydra"):
            continue
        top = key.split(".")[0].split("/")[0]
        if top not in known and (hint := renamed(top, chosen[-1] if chosen else None)):
            out.append(hint)
            continue
        owners = [t for t in tasks if top in owned[t]]
        if top not in core and owners and chosen and not any(top in owned[t] for t in chosen):
            # a task's own setting under another task: name the task that has it (Hydra would say "use +key")
            which = " or ".join(f"task={t}" for t in owners)
            out.append(f"{top}: a setting of {which}, not of task={','.join(chosen)}; add {which}")
            continue
        leaf, types, prefix = (top, typed, "") if "." not in key else (key[7:], LOGGER_TYPES, "logger.") \
            if key.startswith("logger.") and key.count(".") == 1 else (None, {}, "")
        if "{" in value and leaf in types:
            # a mapping where a setting takes a value or a list: Hydra cannot merge it ("Error merging override")
            try:
                parsed = parser.parse_override(arg).value()
            except Exception:
                parsed = None
            if isinstance(parsed, dict):
                out += type_problems({leaf: parsed}, types, prefix)
                continue
        if top not in known:
            close = difflib.get_close_matches(top, sorted(known - {"hydra"}), n=1)
            hint = f" Did you mean {close[0]}?" if close else " (add it with +key=value if it is a new key)"
            out.append(f"{top}: unknown setting.{hint}")
            continue
        if key in groups and "(" not in value:
            names = [n.strip() for n in value.strip("[]").split(",") if n.strip() and n.strip() != "null"]
            options = sorted(p.relative_to(conf / key).with_suffix("").as_posix() for p in (conf / key).rglob("*.yaml"))
            for n in names:
                if n not in options:
                    close = difflib.get_close_matches(n, options, n=3, cutoff=0.6)
                    hint = f" Closest: {', '.join(close)}." if close else f" Options: {', '.join(options)}."
                    out.append(f"{key}={n}: no such {key} option (conf/{key}/{n}.yaml).{hint}")
    return out


def model_key_overrides(args: list[str]) -> list[str]:
    """``model.<key>=v`` for a key every model may have (config.MODEL_KEYS) that the selected model's file does
    not list: added (``++``), as Hydra would only say "Could not override" with "+key" advice; the value is
    then checked like any other (model.seed=abc: must be an integer). ``model.refiner`` too: on a model that is
    not SDXL its check says so in one line."""
    from stablefused.config import MODEL_KEYS

    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" in arg and key.startswith("model.") and key.count(".") == 1 and key[6:] in MODEL_KEYS | set(REFINER_KEYS):
            arg = "++" + arg
        out.append(arg)
    return out


def selected_tasks(args: list[str]) -> list[str]:
    """The task(s) a command line selects: ``task=a[,b]``, else the experiment's (its ``override /task``),
    else the primary config's (txt2img). Empty when it cannot tell (e.g. ``task=choice(...)``)."""
    from omegaconf import OmegaConf

    conf = config_dir()
    task = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("task", "+task", "++task")), None)
    if task is None:
        exp = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "experiment"), None)
        for name in (exp or "").split(","):
            f = conf / "experiment" / f"{name.strip()}.yaml"
            if f.is_file():
                for entry in OmegaConf.load(f).get("defaults") or []:
                    if OmegaConf.is_dict(entry):
                        for k, v in entry.items():
                            if str(k).removeprefix("override ").strip("/") == "task":
                                task = (task + "," if task else "") + str(v)
    if task is None:
        defaults = OmegaConf.load(conf / "config.yaml").get("defaults") or []
        task = next((str(e["task"]) for e in defaults if OmegaConf.is_dict(e) and "task" in e), "txt2img")
    if "(" in task:
        return []
    return [t.strip() for t in task.strip("[]").split(",") if t.strip()]


def main() -> None:
    if sys.argv[1:2] == ["plugins"]:
        from stablefused.cli import print_plugins

        print_plugins(sys.argv[2] if len(sys.argv) > 2 else None)
        return
    if sys.argv[1:2] == ["report"]:
        from stablefused.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if missing := missing_launcher(sys.argv[1:]):
        print(missing, file=sys.stderr)
        sys.exit(2)
    problems = override_problems(sys.argv[1:])
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(2)
    torch.set_grad_enabled(False)
    logging.raiseExceptions = False  # a log file on a full disk must not print a traceback per log line
    sys.argv[1:] = literal_overrides(sys.argv[1:])  # prompts are text: a ${...} in one is never interpolated
    sys.argv[1:] = model_key_overrides(sys.argv[1:])
    hydra_main()
