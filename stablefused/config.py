"""Checks on the composed config, run before any model loads. Each problem is one line naming the key and
what is allowed; every problem found is reported at once (``ConfigError``, one line each).

The top-level keys are the core ones below plus the selected task's own (the keys of
``conf/task/<task>.yaml``); each task checks its own values (:meth:`stablefused.tasks.Task.validate`)."""

from __future__ import annotations

import difflib
from numbers import Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stablefused import registry
from stablefused.errors import ConfigError
from stablefused.paths import config_dir

CORE_KEYS = {
    "name", "task", "prompts", "negative_prompt", "seeds", "combine", "guidance_scales", "steps", "height",
    "width", "batch_size", "eta", "device", "dtype", "progress", "plugin_dirs", "model", "scheduler",
    "guidance", "recorders", "visualizers", "metrics", "logger", "resume", "overwrite",
}
MODEL_KEYS = {
    "name", "builtin", "bundled", "hub_id", "path", "config", "revision", "allow_pickle", "prediction_type",
    "seed", "size_multiple", "height", "width", "example_prompts",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "float16", "bfloat16")
PREDICTION_TYPES = (None, "epsilon", "v_prediction", "sample")


def task_keys(task: str) -> set[str]:
    """The task's own top-level keys: those of ``conf/task/<task>.yaml`` (empty for a task without one)."""
    path = config_dir() / "task" / f"{task}.yaml"
    if not path.is_file():
        return set()
    conf = OmegaConf.load(path)
    keys = set(conf.keys()) - {"task", "defaults"}
    for entry in conf.get("defaults") or []:  # a config group the task selects (``- /walker: interpolate``)
        if isinstance(entry, DictConfig):
            keys |= {str(k).removeprefix("override ").lstrip("/").split("@")[0].split("/")[0] for k in entry}
    return keys


def _unknown(keys: Any, allowed: set[str], where: str, task: str | None = None) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" Did you mean {where}{close[0]}?" if close else ""
            if task is not None and not hint:
                owners = [t for t in _all_tasks() if k in task_keys(t)]
                hint = f" It is a setting of task={owners[0]}, not of task={task}." if owners else ""
            raise ConfigError(f"{where}{k}: unknown setting.{hint} Allowed: {', '.join(sorted(allowed))}")


def _all_tasks() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "task").glob("*.yaml"))


def _int(cfg: Any, key: str, minimum: int | None = None, allow_none: bool = False) -> None:
    v = cfg.get(key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}={v!r}: must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and v < minimum:
        raise ConfigError(f"{key}={v}: must be >= {minimum}")


def _list(cfg: Any, key: str, item_type: type | tuple, what: str, allow_none: bool = False) -> list:
    v = cfg.get(key)
    if v is None and allow_none:
        return []
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r}: must be a list of {what}, e.g. {key}=[{v}]")
    if not isinstance(v, (list, ListConfig)):
        raise ConfigError(f"{key}={v!r}: must be a list of {what}")
    items = list(v)
    if not items:
        raise ConfigError(f"{key}=[]: must hold at least one {what.rstrip('s')}")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, item_type):
            one = what.rstrip("s")
            raise ConfigError(f"{key}: item {x!r} is not {'an' if one[0] in 'aeiou' else 'a'} {one}")
    return items


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every problem found (one line each); cheap checks only (no model loads)."""
    problems: list[str] = []
    for check in (_check_keys, _check_sampling, _check_size, _check_runtime, _check_plugins, _check_task):
        try:
            check(cfg, problems)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _check_keys(cfg: DictConfig, problems: list[str]) -> None:
    from stablefused.tasks import get_task

    get_task(cfg.task)  # an unknown task is one line with the closest name
    _unknown(cfg.keys(), CORE_KEYS | task_keys(cfg.task), "", task=cfg.task)
    _unknown(cfg.model.keys(), MODEL_KEYS, "model.")


def _check_sampling(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    prompts = _list(cfg, "prompts", str, "strings", allow_none=True) or list(model.get("example_prompts") or [])
    if not prompts:
        raise ConfigError(f"prompts: empty, and model {model.name} has no example_prompts; set prompts=[...]")
    if any(not p.strip() for p in prompts):
        raise ConfigError("prompts: an empty prompt; use negative guidance or guidance_scales=[0] for unconditional images")
    seeds = _list(cfg, "seeds", int, "integers")
    _list(cfg, "guidance_scales", Real, "numbers")
    if cfg.combine not in ("product", "zip"):
        raise ConfigError(f"combine={cfg.combine!r}: must be product or zip")
    if cfg.combine == "zip" and len(seeds) != len(prompts):
        raise ConfigError(
            f"seeds: {len(seeds)} seeds for {len(prompts)} prompts with combine=zip; give one seed per prompt "
            "or use combine=product"
        )
    if not isinstance(cfg.negative_prompt, str):
        raise ConfigError(f"negative_prompt={cfg.negative_prompt!r}: must be a string")
    _int(cfg, "steps", 1)
    _int(cfg, "batch_size", 1)
    if not isinstance(cfg.eta, Real) or isinstance(cfg.eta, bool):
        raise ConfigError(f"eta={cfg.eta!r}: must be a number")


def _check_size(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    mult = int(model.get("size_multiple") or 8)
    for key in ("height", "width"):
        try:
            _int(cfg, key, mult, allow_none=True)
            v = cfg.get(key) or model.get(key)
            if v is None:
                raise ConfigError(f"{key}: not set and model {model.name} has no default {key}")
            if v % mult:
                lo, hi = v - v % mult, v - v % mult + mult
                raise ConfigError(f"{key}={v}: must be a multiple of {mult} for model {model.name}; use {lo or hi} or {hi}")
        except ConfigError as e:
            problems.append(str(e))


def _check_runtime(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    checks = [
        (cfg.device not in DEVICES, f"device={cfg.device!r}: must be one of {', '.join(DEVICES)}"),
        (cfg.dtype not in DTYPES, f"dtype={cfg.dtype!r}: must be one of {', '.join(DTYPES)}"),
        (cfg.device == "cpu" and cfg.dtype == "float16",
         "dtype=float16: half precision is not supported on device=cpu; use dtype=float32 or bfloat16"),
        (model.get("prediction_type") not in PREDICTION_TYPES,
         f"model.prediction_type={model.get('prediction_type')!r}: must be epsilon, v_prediction or sample"),
    ]
    for key in ("progress", "resume", "overwrite"):
        checks.append((not isinstance(cfg.get(key), bool), f"{key}={cfg.get(key)!r}: must be true or false"))
    if cfg.logger.name not in ("wandb", "none"):
        checks.append((True, f"logger={cfg.logger.name}: must be wandb or none"))
    sched = cfg.scheduler
    if sched.get("cls"):
        import diffusers

        checks.append((not hasattr(diffusers, sched.cls), f"scheduler.cls={sched.cls}: diffusers has no such scheduler class"))
    problems += [msg for bad, msg in checks if bad]


def _check_plugins(cfg: DictConfig, problems: list[str]) -> None:
    registry.discover(list(cfg.plugin_dirs))
    for check in (lambda: _plugin(cfg.guidance, "schedule", "guidance_schedule", "params", "guidance"),
                  lambda: _plugin(cfg.guidance, "rule", "guidance_rule", "rule_params", "guidance")):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    for kind in ("recorders", "visualizers", "metrics"):
        for name, params in registry.selected(cfg, kind).items():
            try:
                _create_check(kind, name, params, f"{kind}.{name}")
            except ConfigError as e:
                problems.append(str(e))
    from stablefused.records import check_requirements

    try:
        check_requirements(cfg)
    except registry.PluginError as e:
        problems.append(str(e))


def _check_task(cfg: DictConfig, problems: list[str]) -> None:
    from stablefused.tasks import get_task

    get_task(cfg.task).validate(cfg, problems)


def _plugin(group: Any, name_key: str, kind: str, params_key: str, where: str) -> None:
    _create_check(kind, group.get(name_key), group.get(params_key) or {}, f"{where}.{name_key}",
                  f"{where}.{params_key}")


def _create_check(kind: str, name: str, params: Any, where: str, where_params: str | None = None) -> None:
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    try:
        registry.get(kind, name)
    except registry.PluginError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        registry.check_params(kind, name, dict(params or {}))
    except registry.PluginError as e:
        raise ConfigError(f"{where_params or where}: {e}") from None
