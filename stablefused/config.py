"""Checks on the composed config, run before any model loads. Each problem is one line naming the key and
what is allowed; every problem found is reported at once (``ConfigError``, one line each).

The top-level keys are the core ones below plus the selected task's own (the keys of
``conf/task/<task>.yaml``); each task checks its own values (:meth:`stablefused.tasks.Task.validate`)."""

from __future__ import annotations

import difflib
import json
import math
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stablefused import registry
from stablefused.guidance import guider_problems
from stablefused.errors import ConfigError
from stablefused.paths import config_dir

CORE_KEYS = {
    "name", "task", "prompts", "negative_prompt", "seeds", "combine", "guidance_scales", "steps", "height",
    "width", "batch_size", "eta", "device", "dtype", "progress", "plugin_dirs", "model", "scheduler",
    "guidance", "recorders", "visualizers", "metrics", "logger", "resume", "overwrite", "max_pixels", "xyz",
}
MODEL_KEYS = {
    "name", "builtin", "bundled", "hub_id", "path", "config", "revision", "allow_pickle", "prediction_type",
    "seed", "size_multiple", "height", "width", "example_prompts",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "float16", "bfloat16")
PREDICTION_TYPES = (None, "epsilon", "v_prediction", "sample")
MAX_GUIDANCE = 1e4  # |w| beyond this only saturates the latents to inf/NaN (black images)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
TINY_RANDOM_TRAIN_STEPS = 1000  # the scheduler config build_tiny_random uses


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
    for check in (_check_keys, _check_sampling, _check_size, _check_runtime, _check_model, _check_plugins,
                  _check_task, _check_finite, _check_xyz):
        try:
            check(cfg, problems)
        except (ConfigError, registry.PluginError) as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(line for p in problems for line in p.splitlines())))


def _check_keys(cfg: DictConfig, problems: list[str]) -> None:
    from stablefused.tasks import get_task

    get_task(cfg.task)  # an unknown task is one line with the closest name
    _unknown(cfg.keys(), CORE_KEYS | task_keys(cfg.task), "", task=cfg.task)
    _unknown(cfg.model.keys(), MODEL_KEYS, "model.")


def _collect(problems: list[str], *checks: Any) -> None:
    """Run independent checks, keeping every ConfigError's line."""
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))


def _check_sampling(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model

    def prompts_and_seeds() -> None:
        prompts = _list(cfg, "prompts", str, "strings", allow_none=True)
        if not prompts and model.get("example_prompts") is not None:
            try:
                prompts = _list(model, "example_prompts", str, "strings")
            except ConfigError as e:
                raise ConfigError(f"model.{e}") from None
        if not prompts:
            raise ConfigError(f"prompts: empty, and model {model.name} has no example_prompts; set prompts=[...]")
        if any(not p.strip() for p in prompts):
            raise ConfigError("prompts: an empty prompt; use negative guidance or guidance_scales=[0] for unconditional images")
        seeds = _list(cfg, "seeds", int, "integers")
        bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            raise ConfigError(f"seeds: {bad[0]} is out of range; seeds must be in [0, 2**64)")
        if cfg.combine not in ("product", "zip"):
            raise ConfigError(f"combine={cfg.combine!r}: must be product or zip")
        if cfg.combine == "zip" and len(seeds) != len(prompts):
            raise ConfigError(
                f"seeds: {len(seeds)} seeds for {len(prompts)} prompts with combine=zip; give one seed per prompt "
                "or use combine=product"
            )

    def negative() -> None:
        if not isinstance(cfg.negative_prompt, str):
            raise ConfigError(f"negative_prompt={cfg.negative_prompt!r}: must be a string")

    def eta() -> None:
        if not isinstance(cfg.eta, Real) or isinstance(cfg.eta, bool):
            raise ConfigError(f"eta={cfg.eta!r}: must be a number")
        if not 0 <= cfg.eta <= 1:  # NaN fails too
            raise ConfigError(f"eta={cfg.eta}: must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise; "
                              "above 1 the DDIM variance goes negative: NaN images)")

    def scales() -> None:
        for w in _list(cfg, "guidance_scales", Real, "numbers"):
            if not math.isfinite(w):
                raise ConfigError(f"guidance_scales: item {w} is not a finite number (NaN/inf guidance gives black images)")
            if abs(w) > MAX_GUIDANCE:
                raise ConfigError(f"guidance_scales: item {w} is out of range; use |w| <= {MAX_GUIDANCE:g} (larger "
                                  "scales only overflow the latents to inf/NaN: black images)")

    _collect(problems, prompts_and_seeds, scales, negative,
             lambda: _int(cfg, "steps", 1), lambda: _int(cfg, "batch_size", 1), eta)


def _check_size(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    bad_model = [k for k in ("size_multiple", "height", "width") if model.get(k) is not None
                 and (isinstance(model.get(k), bool) or not isinstance(model.get(k), int) or model.get(k) < 1)]
    if bad_model:
        problems += [f"model.{k}={model.get(k)!r}: must be an integer >= 1" for k in bad_model]
        return
    mult = int(model.get("size_multiple") or 8)
    size = {}
    for key in ("height", "width"):
        try:
            _int(cfg, key, mult, allow_none=True)
            v = cfg.get(key) or model.get(key)
            if v is None:
                raise ConfigError(f"{key}: not set and model {model.name} has no default {key}")
            if v % mult:
                lo, hi = v - v % mult, v - v % mult + mult
                raise ConfigError(f"{key}={v}: must be a multiple of {mult} for model {model.name}; use {lo or hi} or {hi}")
            native = model.get(key)
            if isinstance(native, int) and v * 4 <= native:  # a quarter of the trained size: noise, not images
                least = (native // 4 // mult + 1) * mult
                raise ConfigError(f"{key}={v}: far below model {model.name}'s {native} px (a quarter or less: it makes "
                                  f"no recognisable images there); use {key} >= {least}")
            if isinstance(native, int) and v > 8 * native:  # beyond 8x the trained size: repeated tiles, hours
                raise ConfigError(f"{key}={v}: far above model {model.name}'s {native} px (more than 8x); use {key} "
                                  f"<= {8 * native}")
            size[key] = v
        except ConfigError as e:
            problems.append(str(e))
    try:
        _int(cfg, "max_pixels", 1)
    except ConfigError as e:
        problems.append(str(e))
        return
    if len(size) == 2 and isinstance(cfg.batch_size, int) and cfg.batch_size >= 1:
        per_batch = min(cfg.batch_size, _run_images(cfg) or cfg.batch_size)
        total = size["height"] * size["width"] * per_batch
        if total > cfg.max_pixels:
            problems.append(
                f"height={size['height']}, width={size['width']}: {per_batch} image(s) per batch of this size are "
                f"{total:,} pixels, above max_pixels={cfg.max_pixels:,} (memory/time); use a smaller size or "
                f"batch_size, or raise max_pixels")


def _rows(cfg: DictConfig) -> int | None:
    """Prompt/seed rows of a grid task (those whose images the config tells), None otherwise."""
    from stablefused.tasks.txt2img import grid_image_count

    n, scales = _run_images(cfg), grid_image_count(cfg)
    if not n or not scales:
        return None
    return scales // len(cfg.guidance_scales)


def _run_images(cfg: DictConfig) -> int | None:
    """Images of the whole run, when the task can tell from the config alone (``Task.image_count``)."""
    from stablefused.tasks import get_task

    try:
        return get_task(cfg.task).image_count(cfg)
    except ConfigError:
        return None


def _check_runtime(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    device = _resolved_device(cfg.device)
    checks = [
        (cfg.device not in DEVICES, f"device={cfg.device!r}: must be one of {', '.join(DEVICES)}"),
        (cfg.dtype not in DTYPES, f"dtype={cfg.dtype!r}: must be one of {', '.join(DTYPES)}"),
        (cfg.device in ("cuda", "mps") and device != cfg.device,
         f"device={cfg.device}: no {cfg.device.upper() if cfg.device == 'cuda' else 'MPS'} device is available here; "
         "use device=cpu or device=auto"),
        (device == "cpu" and cfg.dtype == "float16",
         "dtype=float16: half precision is not supported on the CPU"
         + (" (device=auto found no GPU)" if cfg.device == "auto" else "") + "; use dtype=float32 or bfloat16"),
        (model.get("prediction_type") not in PREDICTION_TYPES,
         f"model.prediction_type={model.get('prediction_type')!r}: must be epsilon, v_prediction or sample"),
    ]
    for key in ("progress", "resume", "overwrite"):
        checks.append((not isinstance(cfg.get(key), bool), f"{key}={cfg.get(key)!r}: must be true or false"))
    if cfg.logger.name not in ("wandb", "none"):
        checks.append((True, f"logger={cfg.logger.name}: must be wandb or none"))
    sched = cfg.scheduler
    if sched.get("cls") is not None and not isinstance(sched.get("cls"), str):
        checks.append((True, f"scheduler.cls={sched.get('cls')!r}: must be a diffusers scheduler class name"))
    elif sched.get("cls"):
        import diffusers

        checks.append((not hasattr(diffusers, sched.cls), f"scheduler.cls={sched.cls}: diffusers has no such scheduler class"))
    problems += [msg for bad, msg in checks if bad]


def _resolved_device(device: Any) -> str:
    """What ``device`` will be, decided cheaply (no model): cuda, mps or cpu (as models.resolve_device)."""
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda":
        return "cuda" if cuda else "cpu"
    if device == "mps":
        return "mps" if mps else "cpu"
    return str(device)


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    """The model's files, without loading them: a missing path, a corrupt .safetensors, hub weights that are
    not downloaded while offline; and ``steps`` against the scheduler's training steps where its config is
    on disk (local folders, bundled models, the hub cache; tiny_random: 1000)."""
    from stablefused.models import hub_files_missing, model_source, safetensors_problem

    model = cfg.model
    kinds = {"name": str, "builtin": str, "bundled": str, "hub_id": str, "path": str, "config": str, "revision": str,
             "allow_pickle": bool, "seed": int}
    bad = [k for k, t in kinds.items() if model.get(k) is not None and (not isinstance(model.get(k), t) or
                                                                         (t is int and isinstance(model.get(k), bool)))]
    problems += [f"model.{k}={model.get(k)!r}: must be {_A[kinds[k]]}" for k in bad]
    if model.get("builtin") is not None and not bad:
        from stablefused.models import builtin_models

        if model.builtin not in builtin_models():
            problems.append(f"model.builtin={model.builtin!r}: not a model built in code; those are "
                            f"{', '.join(sorted(builtin_models()))}")
    if not isinstance(cfg.get("name"), str) or not cfg.get("name"):
        problems.append(f"name={cfg.get('name')!r}: must be a non-empty string (the run dir is runs/<name>/...)")
    if not isinstance(cfg.scheduler.get("name"), (str, type(None))):
        problems.append(f"scheduler.name={cfg.scheduler.get('name')!r}: must be a string")
    if not isinstance(cfg.scheduler.get("overrides"), (DictConfig, dict, type(None))):
        problems.append(f"scheduler.overrides={cfg.scheduler.get('overrides')!r}: must be a mapping, e.g. "
                        "+scheduler.overrides.timestep_spacing=trailing")
    if bad or len(problems) and problems[-1].startswith("model.builtin"):
        return
    try:
        source = model_source(model)
    except Exception as e:  # ModelLoadError: no source at all
        problems.append(str(e))
        return
    sched_json = None
    if source.startswith("builtin:"):
        train_steps = TINY_RANDOM_TRAIN_STEPS
    else:
        path = Path(source)
        where = "model.path" if model.get("path") else "model.bundled" if model.get("bundled") else None
        if where and not path.exists():
            kind = "file" if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") else "folder"
            problems.append(f"{where}={model.get('path') or model.get('bundled')}: no such {kind} ({path})")
            return
        if path.is_file() and path.suffix == ".safetensors":
            bad = safetensors_problem(path)
            if bad:
                problems.append(f"model.path={model.path}: {bad}; download or convert it again")
            return
        if path.is_dir():
            sched_json = path / "scheduler" / "scheduler_config.json"
        elif where is None:  # a hub id
            if hub_files_missing(source, "model_index.json", revision=model.get("revision")):
                problems.append(f"model={model.name}: {source} is not downloaded and the hub is offline "
                                f"(HF_HUB_OFFLINE); run `hf download {source}` with network, or set "
                                "model.path=<local diffusers folder or .safetensors file>")
                return
            sched_json = _cached_hub_file(source, "scheduler/scheduler_config.json", model.get("revision"))
        train_steps = None
        if sched_json is not None and Path(sched_json).is_file():
            try:
                train_steps = int(json.loads(Path(sched_json).read_text()).get("num_train_timesteps", 1000))
            except (OSError, ValueError, TypeError):
                train_steps = None
    steps = cfg.get("steps")
    if train_steps and isinstance(steps, int) and not isinstance(steps, bool) and steps > train_steps:
        problems.append(f"steps={steps}: more than the {train_steps} timesteps model {model.name}'s scheduler was "
                        f"trained with; use steps <= {train_steps}")


_A = {str: "a string", bool: "true or false", int: "an integer"}


def _cached_hub_file(repo: str, filename: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:
        return None
    return found if isinstance(found, str) else None


def _check_finite(cfg: DictConfig, problems: list[str]) -> None:
    """Every number anywhere in the config (scheduler overrides, plugin parameters, task keys, ...) must be
    finite; runs last and names only keys that no specific check has already named."""
    data = OmegaConf.to_container(cfg, resolve=False)

    def walk(x: Any, path: str) -> None:
        if isinstance(x, float) and not math.isfinite(x):
            base = path.split("[")[0]
            if not any(p.startswith((f"{path}=", f"{path}:", f"{base}=", f"{base}:")) for p in problems):
                problems.append(f"{path}={x}: not a finite number; NaN/inf settings give NaN latents (black images)")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(data, "")


def _check_plugins(cfg: DictConfig, problems: list[str]) -> None:
    try:
        registry.discover(registry.plugin_dirs(cfg.plugin_dirs))
    except registry.PluginError as e:
        problems.append(str(e) if str(e).startswith("plugin_dirs") else f"plugin_dirs: {e}")
    for check in (lambda: _plugin(cfg.guidance, "schedule", "guidance_schedule", "params", "guidance"),
                  lambda: _plugin(cfg.guidance, "rule", "guidance_rule", "rule_params", "guidance")):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    problems += guider_problems(cfg)
    steps = cfg.get("steps") if isinstance(cfg.get("steps"), int) else None
    for kind in ("recorders", "visualizers", "metrics"):
        for name, params in registry.selected(cfg, kind).items():
            try:
                _create_check(kind, name, params, f"{kind}.{name}")
            except ConfigError as e:
                problems.append(str(e))
            if steps is None:
                continue
            images = _run_images(cfg)
            for key in ("samples", "sample", "rows"):
                v = params.get(key)
                items = v if isinstance(v, list) else [v]
                limit = images if key != "rows" else _rows(cfg)
                if limit and any(isinstance(x, int) and not isinstance(x, bool) and x >= limit for x in items):
                    problems.append(f"{kind}.{name}.{key}={_show(v)}: this run has {limit} "
                                    f"{'rows' if key == 'rows' else 'images'} (indices 0..{limit - 1})")
            for key in ("samples", "rows", "steps", "tokens", "panels", "stats", "layers"):
                if isinstance(params.get(key), list) and not params[key]:
                    default = registry.param_default(kind, name, key)
                    problems.append(f"{kind}.{name}.{key}=[]: selects nothing; list at least one"
                                    + (" or set null for all" if default is None else ""))
            every, step_list = params.get("every"), params.get("steps")
            if isinstance(every, int) and every > steps:
                problems.append(f"{kind}.{name}.every={every}: larger than steps={steps} (only the first and last "
                                f"steps would be recorded); use every <= {steps}")
            if isinstance(step_list, list) and any(isinstance(s, int) and s >= steps for s in step_list):
                problems.append(f"{kind}.{name}.steps={_show(step_list)}: step indices count from 0 and must be "
                                f"< steps={steps}")
    from stablefused.records import check_requirements

    try:
        check_requirements(cfg)
    except registry.PluginError as e:
        problems.append(str(e))


def _check_task(cfg: DictConfig, problems: list[str]) -> None:
    from stablefused.tasks import get_task

    get_task(cfg.task).validate(cfg, problems)


def _plugin(group: Any, name_key: str, kind: str, params_key: str, where: str) -> None:
    _create_check(kind, group.get(name_key), group.get(params_key), f"{where}.{name_key}", f"{where}.{params_key}")


def _show(value: Any) -> str:
    return str(value).replace(" ", "")


def _create_check(kind: str, name: str, params: Any, where: str, where_params: str | None = None) -> None:
    """The plugin exists and takes these parameters with these values: every bad value is one line
    ``<where_params>.<param>=<value>: must be ...`` (see :func:`stablefused.registry.param_problems`)."""
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    try:
        registry.get(kind, name)
    except registry.PluginError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(params, (dict, type(None))):
        raise ConfigError(f"{where_params or where}={params!r}: must be a mapping of parameter: value")
    try:
        registry.check_params(kind, name, dict(params or {}))
    except registry.ParamError as e:
        raise ConfigError("\n".join(f"{where_params or where}.{p}" for p in e.problems)) from None
    except registry.PluginError as e:
        raise ConfigError(f"{where_params or where}: {e}") from None


def _check_xyz(cfg: DictConfig, problems: list[str]) -> None:
    """``experiment=xyz``: each of ``xyz.x``/``y``/``z`` is null or names a setting of this config, once."""
    axes = cfg.get("xyz")
    if axes is None:
        return
    if not isinstance(axes, DictConfig) or set(axes.keys()) - {"x", "y", "z"}:
        raise ConfigError(f"xyz={axes!r}: must hold x, y and z, each a setting's name or null")
    seen: dict[str, str] = {}
    for axis in ("x", "y", "z"):
        key = axes.get(axis)
        if key is None:
            continue
        if not isinstance(key, str) or not key or key == "xyz" or key.startswith("xyz."):
            problems.append(f"xyz.{axis}={key!r}: must name a setting, e.g. xyz.{axis}=steps")
        elif OmegaConf.select(cfg, key, default="\0missing") == "\0missing":
            close = difflib.get_close_matches(key, sorted(k for k in cfg.keys() if k != "xyz"), n=1)
            problems.append(f"xyz.{axis}={key}: no such setting" + (f"; did you mean {close[0]}?" if close else ""))
        elif key in seen:
            problems.append(f"xyz.{axis}={key}: already the {seen[key]} axis; give each axis its own setting")
        else:
            seen[key] = axis
