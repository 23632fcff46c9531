"""Checks on the composed config, run before any model loads. Each problem is one line naming the key and
what is allowed; every problem found is reported at once (``ConfigError``, one line each).

The top-level keys are the core ones below plus the selected task's own (the keys of
``conf/task/<task>.yaml``); each task checks its own values (:meth:`stablefused.tasks.Task.validate`)."""

from __future__ import annotations

import difflib
import json
import math
import typing
from numbers import Real
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from stablefused import registry
from stablefused.guidance import guider_problems
from stablefused.errors import ConfigError
from stablefused.paths import config_dir

CORE_KEYS = {
    "name", "task", "prompts", "negative_prompt", "seeds", "combine", "guidance_scales", "steps", "height",
    "width", "batch_size", "eta", "device", "dtype", "progress", "plugin_dirs", "model", "scheduler",
    "guidance", "recorders", "visualizers", "metrics", "logger", "resume", "overwrite", "max_pixels", "xyz",
    "threads",
}
MODEL_KEYS = {
    "name", "builtin", "bundled", "hub_id", "path", "config", "revision", "allow_pickle", "prediction_type",
    "seed", "size_multiple", "height", "width", "example_prompts", "family", "offload", "gpu_dtype",
}
# Settings renamed so that one name means one thing (``frames``/``fps`` meant per-segment/walk video in
# task=walk and per-video/MP4 in task=txt2video): old name -> {task: new name}.
RENAMED = {"frames": {"walk": "segment_frames", "txt2video": "video_frames"},
           "fps": {"walk": "walk_fps", "txt2video": "video_fps"}}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: the model's gpu_dtype on a GPU, else float32
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


def renamed(key: str, task: str | None = None) -> str | None:
    """The one-line hint for a setting's old name (:data:`RENAMED`), for ``task`` or for every task."""
    new = RENAMED.get(key)
    if not new:
        return None
    if task in new:
        return f"{key}: renamed; did you mean {new[task]}? (task={task})"
    return f"{key}: renamed; did you mean " + " or ".join(f"{v} (task={t})" for t, v in new.items()) + "?"


def _unknown(keys: Any, allowed: set[str], where: str, task: str | None = None) -> None:
    for k in keys:
        if not where and (hint := renamed(str(k), task)):
            raise ConfigError(hint)
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
        fits = isinstance(v, item_type) and not isinstance(v, bool)
        raise ConfigError(f"{key}={v!r}: must be a list of {what}" + (f", e.g. {key}=[{v}]" if fits else ""))
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


# ------------------------------------------------------------------------------------------ declared types
# Every top-level setting has a type: the one its default in conf/config.yaml or conf/task/<task>.yaml has
# (7.5 -> a number, [0, 1] -> a list of integers, true -> true or false, "crop" -> a string), except where a
# default cannot tell (null, or an integer default of a setting that takes any number): those are declared
# here and by each task (``Task.types``), as plugins declare theirs with their constructors' type hints.
# Values are checked generically with the plugins' checker (registry.type_problem), one line per setting.
CORE_TYPES: dict[str, Any] = {
    "prompts": Optional[list[str]], "height": Optional[int], "width": Optional[int], "eta": Real,
    "name": str, "task": str, "threads": Optional[int],
}
LOGGER_TYPES: dict[str, Any] = {"project": str, "entity": Optional[str], "mode": Optional[str], "tags": list[str]}
NOT_TYPED = {"model", "scheduler", "guidance", "recorders", "visualizers", "metrics", "logger", "xyz", "walker",
             "defaults", "plugin_dirs"}  # groups have their own checks; plugin_dirs: a folder or a list of them


def _hint_of(default: Any) -> Any:
    """The type a default value declares (None for null and mappings: nothing to tell)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return Real  # any number: finiteness and ranges are each setting's own check
    if isinstance(default, str):
        return str
    if isinstance(default, (list, ListConfig)):
        items = list(default)
        if items and all(isinstance(x, str) for x in items):
            return list[str]
        if items and any(isinstance(x, float) for x in items):
            return list[Real]
        if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            return list[int]
        return list
    return None


def declared_types(task: str | None) -> dict[str, Any]:
    """Top-level setting -> type hint, for the core settings and those of ``task``."""
    from stablefused.tasks import get_task

    out: dict[str, Any] = {}
    files = [config_dir() / "config.yaml"] + ([config_dir() / "task" / f"{task}.yaml"] if task else [])
    for f in files:
        if f.is_file():
            for k, v in OmegaConf.to_container(OmegaConf.load(f), resolve=False).items():
                if k not in NOT_TYPED and (hint := _hint_of(v)) is not None:
                    out[k] = hint
    out.update(CORE_TYPES)
    if task:
        try:
            out.update(get_task(task).types)
        except ConfigError:
            pass
    return out


def type_problems(values: dict[str, Any], types: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per value that does not fit its declared type: ``<key>=<value>: must be <what>``."""
    if OmegaConf.is_config(values):
        try:  # a value written as ${other.setting} is checked as what it resolves to
            values = OmegaConf.to_container(values, resolve=True)
        except Exception:
            values = OmegaConf.to_container(values, resolve=False)
    out = []
    for key, value in values.items():
        hint = types.get(key)
        if hint is None:
            continue
        what = registry.type_problem(value, hint)
        if what is None:
            continue
        example = ""
        item = next((a for a in typing.get_args(hint) if typing.get_origin(a) is list), hint)
        if (typing.get_origin(item) is list and isinstance(value, (int, float, str)) and not isinstance(value, bool)
                and registry.type_problem(value, typing.get_args(item)[0]) is None):
            example = f", e.g. {prefix}{key}=[{value}]"
        out.append(f"{prefix}{key}={_show_value(value)}: must be {what}{example}")
    return out


def _show_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_show_value(v) for v in value) + "]"
    return str(value)


def _check_types(cfg: DictConfig, problems: list[str]) -> None:
    task = cfg.get("task") if isinstance(cfg.get("task"), str) else None
    problems += type_problems(cfg, declared_types(task))
    if cfg.get("logger") is not None and OmegaConf.is_dict(cfg.logger) and cfg.logger.get("name") == "wandb":
        problems += type_problems(cfg.logger, LOGGER_TYPES, "logger.")


def _typed_key(line: str) -> str:
    """The setting a problem line starts with (``steps=...``, ``seeds: ...``, ``logger.tags=...``)."""
    import re

    m = re.match(r"[\w.]+", line)
    return m.group(0) if m else ""


TEXT_KEYS = ("prompts", "negative_prompt", "model.example_prompts")  # literal text: never interpolated


def literal_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with the prompts made literal text: a ``${`` in ``prompts=``/``negative_prompt=``
    (also ``+``/``++`` and sweeps) is escaped for OmegaConf, so ``prompts=['${steps}']`` is those characters,
    never the value of steps (nor an error for a key or variable that does not exist)."""
    import re

    out = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+")
        if "=" in arg and key in TEXT_KEYS and "${" in arg:
            k, v = arg.split("=", 1)
            arg = k + "=" + re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", v)
        out.append(arg)
    return out


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every problem found (one line each); cheap checks only (no model loads).

    The declared types are checked first; a later check that trips over a value of the wrong type (any
    exception) adds nothing. A setting whose own check names it keeps that line (it says more: ranges,
    examples), the others get the type's line."""
    problems: list[str] = []
    typed: list[str] = []
    _check_types(cfg, typed)
    for check in (_check_keys, _check_sampling, _check_size, _check_runtime, _check_model, _check_family,
                  _check_plugins, _check_task, _check_finite, _check_xyz, _check_logger):
        try:
            check(cfg, problems)
        except (ConfigError, registry.PluginError) as e:
            problems.append(str(e))
        except Exception:
            if not typed:
                raise
    lines = [line for p in problems for line in p.splitlines()]
    named = {_typed_key(x).split("[")[0] for x in lines}
    lines = [x for x in typed if _typed_key(x) not in named] + lines  # a setting's own check says it better
    if lines:
        raise ConfigError("\n".join(dict.fromkeys(lines)))


def _check_keys(cfg: DictConfig, problems: list[str]) -> None:
    from stablefused.tasks import get_task

    get_task(cfg.task)  # an unknown task is one line with the closest name
    _unknown(cfg.keys(), CORE_KEYS | task_keys(cfg.task), "", task=cfg.task)
    from stablefused.families import family_settings, settings_problems

    _unknown(cfg.model.keys(), MODEL_KEYS | family_settings(), "model.")
    problems += settings_problems(cfg.model)


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
                raise ConfigError(f"{key}: not set and model {model.name} has no default {key} (model.{key} is "
                                  f"null); set {key}=<pixels>")
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
    from stablefused.tasks import get_task

    try:
        task = get_task(cfg.task)
    except ConfigError:
        return
    if task.size_from_inputs and (cfg.get("height") is None or cfg.get("width") is None):
        return  # the size comes from the input images: the task checks max_pixels against it
    if len(size) == 2 and isinstance(cfg.batch_size, int) and cfg.batch_size >= 1:
        per_batch = min(cfg.batch_size, _run_images(cfg) or cfg.batch_size)
        try:
            frames = max(1, int(task.frames_per_output(cfg)))
        except (TypeError, ValueError):
            frames = 1
        total = size["height"] * size["width"] * per_batch * frames
        what = f"{per_batch} image(s)" if frames == 1 else f"{per_batch} video(s) of {frames} frames"
        if total > cfg.max_pixels:
            problems.append(
                f"height={size['height']}, width={size['width']}: {what} per batch of this size are "
                f"{total:,} pixels, above max_pixels={cfg.max_pixels:,} (memory/time); use a smaller size or "
                f"batch_size" + (", fewer frames" if frames > 1 else "") + ", or raise max_pixels")


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
    threads = cfg.get("threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads < 1:
        checks.append((True, f"threads={threads}: must be >= 1 (or null: torch's default)"))
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
                from stablefused.models import hub_unavailable_reason

                problems.append(f"model={model.name}: {source} is not downloaded and {hub_unavailable_reason()}; "
                                f"run `hf download {source}` with network, or set "
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


def _check_family(cfg: DictConfig, problems: list[str]) -> None:
    """The model-level GPU settings, and what the model's family cannot do (``Family.unsupported``, e.g.
    attention maps on Flux) where the family is known before loading (``model.family``, a built-in, or the
    model_index.json of a local folder or cached hub model); an SDXL refiner (``model.refiner``) and what it
    needs (an SDXL model, a task and scheduler that hand over, its own files)."""
    from stablefused.families import family_class, family_names, family_of_model_cfg
    from stablefused.families.sdxl import refiner_problems
    from stablefused.models import OFFLOAD_MODES

    problems += refiner_problems(cfg)

    if cfg.model.get("gpu_dtype") not in (None, "float32", "float16", "bfloat16"):
        problems.append(f"model.gpu_dtype={cfg.model.get('gpu_dtype')!r}: must be null, float32, float16 or bfloat16 "
                        "(the model's dtype on a GPU under dtype=auto)")
    if cfg.model.get("offload") not in OFFLOAD_MODES:
        problems.append(f"model.offload={cfg.model.get('offload')!r}: must be null (all on the device), model (one "
                        "module at a time on the GPU) or sequential (one layer at a time: least GPU memory)")
    name = family_of_model_cfg(cfg.model)
    if name is None:
        return
    if name not in family_names():
        problems.append(f"model.family={name!r}: unknown; families: {', '.join(family_names())}")
        return
    problems += family_class(name).unsupported(cfg)


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
    shape = None
    for kind in ("recorders", "visualizers", "metrics"):
        for name, params in registry.selected(cfg, kind).items():
            try:
                _create_check(kind, name, params, f"{kind}.{name}")
            except ConfigError as e:
                problems.append(str(e))
            if steps is not None:  # the plugin's parameters against this run (indices, steps): its declarations
                shape = shape or registry.RunShape(steps=steps, images=_run_images(cfg), rows=_rows(cfg))
                problems += [f"{kind}.{name}.{p}" for p in registry.run_problems(registry.get(kind, name), params, shape)]
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


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
WANDB_PROJECT_BAD = "/\\#?%:"


def _check_logger(cfg: DictConfig, problems: list[str]) -> None:
    """``logger=wandb``: mode (and $WANDB_MODE), project, entity and tags as W&B accepts them, checked here
    rather than by ``wandb.init`` after the model has loaded."""
    import os

    lg = cfg.get("logger")
    if not OmegaConf.is_dict(lg) or lg.get("name") != "wandb":
        return
    mode = lg.get("mode")
    if isinstance(mode, str) and mode not in WANDB_MODES:
        problems.append(f"logger.mode={mode!r}: must be one of {', '.join(WANDB_MODES[:3])} (or null: $WANDB_MODE, "
                        "else offline)")
    env = os.environ.get("WANDB_MODE")
    if mode is None and env and env not in WANDB_MODES:
        problems.append(f"WANDB_MODE={env!r} (environment): must be one of {', '.join(WANDB_MODES[:3])}; unset it or "
                        "set logger.mode=offline")
    project = lg.get("project")
    if isinstance(project, str):
        if not project.strip():
            problems.append("logger.project='': must name a W&B project, e.g. logger.project=stablefused")
        elif any(c in project for c in WANDB_PROJECT_BAD) or len(project) > 128:
            problems.append(f"logger.project={project!r}: W&B project names are at most 128 characters without any "
                            f"of {' '.join(WANDB_PROJECT_BAD)}")
    entity = lg.get("entity")
    if isinstance(entity, str) and not entity.strip():
        problems.append("logger.entity='': set a W&B user or team name, or null for your default entity")
    tags = lg.get("tags")
    if isinstance(tags, (list, ListConfig)):
        for t in tags:
            if isinstance(t, str) and not 0 < len(t) <= 64:
                problems.append(f"logger.tags: tag {t[:20] + '...' if len(t) > 20 else t!r} has {len(t)} characters; "
                                "W&B tags have 1 to 64")


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
