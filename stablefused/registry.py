"""Plugin registry: short stable names per kind, found in three places.

1. Built-in plugins: every ``plugins/<kind>/<name>.py`` file shipped with StableFused.
2. Extra folders named in config (``plugin_dirs: [my_plugins]``), laid out the same way.
3. Third-party packages: entry points in the group ``stablefused.plugins``; each entry point names a module
   (imported, so its ``@register`` decorators run) or a callable (called once with no arguments).

A plugin is a class decorated with ``@register(kind, name)``. Its parameters are the keyword arguments of
its constructor; config passes them through (``guidance.rule=apg +guidance.rule_params.eta=0``; ``+`` because the guidance group lists no rule parameters).

    from stablefused.registry import register

    @register("metrics", "brightness")
    class Brightness:
        "Mean pixel value of each image."
        def __call__(self, images, records): ...
"""

from __future__ import annotations

import difflib
import numbers
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from stablefused.errors import PluginError
from stablefused.paths import builtin_plugins_dir

__all__ = ["PluginError", "ParamError", "register", "get", "create", "check_params", "param_problems", "run_problems",
           "RunShape", "discover", "plugin_dirs", "list_plugins", "list_names", "param_defaults", "store_defaults"]

KINDS = (
    "guidance_schedule",
    "guidance_rule",
    "perturbation",
    "recorders",
    "visualizers",
    "metrics",
    "walkers",
)
ENTRY_POINT_GROUP = "stablefused.plugins"

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_loaded_dirs: set[Path] = set()
_entry_points_loaded = False


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Class/function decorator: make ``obj`` selectable as ``<kind>=<name>``."""
    if kind not in _REGISTRY:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")

    def deco(obj: Any) -> Any:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and _qualname(existing) != _qualname(obj):
            raise PluginError(
                f"{kind} plugin {name!r} is registered twice: {_qualname(existing)} and {_qualname(obj)}"
            )
        _REGISTRY[kind][name] = obj
        obj.plugin_kind, obj.plugin_name = kind, name
        return obj

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def load_plugin_dir(folder: str | Path) -> None:
    """Import every ``<kind>/<name>.py`` below ``folder`` (once per folder), for the plugin kinds only:
    nothing else below ``folder`` is imported."""
    folder = Path(folder).resolve()
    if folder in _loaded_dirs:
        return
    if not folder.is_dir():
        raise PluginError(f"plugin_dirs: {folder} is not a folder")
    _loaded_dirs.add(folder)
    files = sorted(f for kind in KINDS for f in (folder / kind).glob("*.py") if (folder / kind).is_dir())
    for file in files:
        if file.name.startswith("_"):
            continue
        kind = file.parent.name
        prefix = "stablefused_plugins" if folder == builtin_plugins_dir().resolve() else f"stablefused_user_plugins_{len(_loaded_dirs)}"
        mod_name = f"{prefix}.{kind}.{file.stem}"
        if mod_name in sys.modules:
            continue
        _ensure_parents(mod_name)
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[mod_name]
            raise


def plugin_dirs(value: Any) -> list[str]:
    """``plugin_dirs`` as a list of folders: a single string is one folder (never read letter by letter)."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        bad = [v for v in value if not isinstance(v, (str, Path))]
        if bad:
            raise PluginError(f"plugin_dirs: item {bad[0]!r} is not a folder path")
        return [str(v) for v in value]
    raise PluginError(f"plugin_dirs={value!r}: must be a folder or a list of folders")


def _ensure_parents(mod_name: str) -> None:
    """Make ``a`` and ``a.b`` importable for a plugin module ``a.b.c`` loaded from a file."""
    parts = mod_name.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []
            sys.modules[name] = module


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if callable(obj) and not inspect.isclass(obj):
            obj()


def discover(extra_dirs: list[str | Path] | str | Path = ()) -> None:
    """Load built-in plugins, entry points and any extra folders (a single folder may be given as a string)."""
    load_plugin_dir(builtin_plugins_dir())
    _load_entry_points()
    for d in plugin_dirs(extra_dirs):
        load_plugin_dir(d)


def get(kind: str, name: str) -> Any:
    """The plugin class/function registered as ``name`` for ``kind``; a helpful error otherwise."""
    discover()
    if kind not in _REGISTRY:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        names = sorted(_REGISTRY[kind])
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"no {kind} plugin named {name!r}.{hint} Available: {', '.join(names) or '(none)'}"
        ) from None


def check_params(kind: str, name: str, params: dict, /) -> Any:
    """The plugin class for ``name``, after checking that it accepts every key of ``params`` and every value
    (:func:`param_problems`); the first problem is raised as a ``PluginError``."""
    cls = get(kind, name)
    accepted = _parameters(cls)
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in params if k not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                f"{kind} plugin {name!r} has no parameter {unknown[0]!r}.{hint} "
                f"Parameters: {', '.join(accepted) or '(none)'}"
            )
    problems = param_problems(cls, params)
    if problems:
        raise ParamError(problems)
    return cls


# ------------------------------------------------------------------------------------ parameter values
# A plugin declares its parameters' types with its constructor's type hints (int, float, bool, str,
# list[int], Literal["a", "b"], int | None, ...) and, optionally, inclusive ranges in a class attribute
#     ranges = {"frac": (0, 1), "every": (1, None)}      # None: unbounded on that side; list items each
# and cross-parameter rules in an optional classmethod ``check(params) -> list[str]`` (params: the
# constructor's defaults updated with the configured values; each line starts with the parameter it names).
# Config validation reports every problem as ``<where>.<param>=<value>: <what is allowed>``.


class ParamError(PluginError):
    """Bad plugin parameter values; ``problems`` holds one line per value, each starting ``param=value:``."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def param_problems(cls: Any, params: dict) -> list[str]:
    """One line per parameter value of ``params`` that ``cls`` does not accept (types, ranges, ``check``)."""
    import math
    import typing

    accepted = _parameters(cls)
    try:
        target = cls.__init__ if inspect.isclass(cls) else cls
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: no type checks, the ranges and check() still apply
        hints = {}
    ranges = getattr(cls, "ranges", {}) or {}
    out = []
    for key, value in params.items():
        if key not in accepted:
            continue
        hint = hints.get(key)
        what = None if hint is None else type_problem(value, hint)
        if what is None and key in ranges:
            lo, hi = ranges[key]
            items = value if isinstance(value, (list, tuple)) else [value]
            for x in items:
                if isinstance(x, (int, float)) and not isinstance(x, bool) and not (
                        math.isfinite(x) and (lo is None or x >= lo) and (hi is None or x <= hi)):
                    what = _range_text(lo, hi) + (" (each item)" if items is value else "")
                    break
        if what is not None:
            out.append(f"{key}={_show(value)}: must be {what}")
    if not out and hasattr(cls, "check"):
        defaults = {k: p.default for k, p in accepted.items() if p.default is not inspect.Parameter.empty}
        out += list(cls.check({**defaults, **params}) or [])
    return out


# ------------------------------------------------------------------------------- against the run
# A plugin names the parameters that refer to the run in a class attribute (the core knows no names):
#     run_params = {"samples": "images", "rows": "rows", "steps": "steps", "every": "every", "tokens": "list"}
# images / rows: indices of the run's images / grid rows; steps: step indices; every: a step interval;
# list: a list that must select something. Each list-valued one given as [] selects nothing (a problem).
# Anything else goes in an optional classmethod ``check_run(params, run: RunShape) -> list[str]``.
RUN_PARAM_KINDS = ("images", "rows", "steps", "every", "list")


@dataclass
class RunShape:
    """What the config alone tells about a run, for :func:`run_problems`."""

    steps: int
    images: int | None = None  # images the run makes (None: depends on files)
    rows: int | None = None  # prompt/seed rows of a grid task


def run_problems(cls: Any, params: dict, run: RunShape) -> list[str]:
    """One line per value of ``params`` that cannot work for this run, by the plugin's ``run_params`` and
    ``check_run``; each line starts ``<param>=<value>:``."""
    declared = getattr(cls, "run_params", None) or {}
    out: list[str] = []
    for key, what in declared.items():  # indices beyond the run
        v = params.get(key)
        items = v if isinstance(v, list) else [v]
        limit = {"images": run.images, "rows": run.rows}.get(what)
        if limit and any(isinstance(x, int) and not isinstance(x, bool) and x >= limit for x in items):
            out.append(f"{key}={_compact(v)}: this run has {limit} {what} (indices 0..{limit - 1})")
    for key, what in declared.items():  # lists that select nothing
        if isinstance(params.get(key), list) and not params[key]:
            p = _parameters(cls).get(key)
            out.append(f"{key}=[]: selects nothing; list at least one"
                       + (" or set null for all" if p is not None and p.default is None else ""))
    for key, what in declared.items():  # steps
        v = params.get(key)
        if what == "every" and isinstance(v, int) and v > run.steps:
            out.append(f"{key}={v}: larger than steps={run.steps} (only the first and last steps would be "
                       f"recorded); use {key} <= {run.steps}")
        if what == "steps" and isinstance(v, list) and any(isinstance(s, int) and s >= run.steps for s in v):
            out.append(f"{key}={_compact(v)}: step indices count from 0 and must be < steps={run.steps}")
    if hasattr(cls, "check_run"):
        out += list(cls.check_run(params, run) or [])
    return out


def _compact(value: Any) -> str:
    return str(value).replace(" ", "")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def _range_text(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo:g}, {hi:g}]"
    return f">= {lo:g}" if lo is not None else f"<= {hi:g}"


def type_problem(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits the type hint, else what it must be ("an integer", "one of a, b", ...)."""
    import math
    import types as _types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if origin is typing.Annotated:
        return type_problem(value, args[0])
    if origin in (typing.Union, _types.UnionType):
        probs = [type_problem(value, a) for a in args]
        if any(p is None for p in probs):
            return None
        return " or ".join(dict.fromkeys(p for p in probs if p))
    if hint is type(None):
        return None if value is None else "null"
    if origin is typing.Literal:
        try:
            ok = value in args and not isinstance(value, bool)
        except TypeError:  # unhashable (a list or mapping)
            ok = False
        return None if ok else "one of " + ", ".join(map(str, args))
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is numbers.Real:  # any number (finiteness and range are checked by whoever declares it)
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            inner = type_problem(None, args[0]) if args else None
            return "a list" + (f" (each {inner})" if inner else "")
        for x in value:
            if args and args[0] is not Ellipsis:
                inner = type_problem(x, args[0])
                if inner is not None:
                    return f"a list, each item {inner}"
        return None
    return None  # a type this checker does not know: accepted


SELECTED = "_selected_"  # set by every conf/<kind>/<name>.yaml: the plugin was chosen in the group selection


def selected(cfg: Any, kind: str, warn: bool = False) -> dict[str, dict]:
    """The plugins of ``kind`` (recorders, visualizers, metrics) that ``cfg`` selects, with their parameters.

    A plugin is selected through its config group (``visualizers=[denoise_video]``), whose file marks the
    node with ``_selected_: true``. Parameters that an experiment (or ``+visualizers.x.y=``) sets for a plugin
    that is not selected are ignored with a warning, so ``visualizers=[]`` really removes every visualizer."""
    import logging

    from omegaconf import OmegaConf

    out = {}
    for name, params in (cfg.get(kind) or {}).items():
        params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else params
        params = dict(params or {})
        if not params.pop(SELECTED, False):
            if warn:
                logging.getLogger("stablefused").warning(
                    "%s.%s: parameters set but the plugin is not selected; ignored (select it with %s=[...,%s])",
                    kind, name, kind, name)
            continue
        out[name] = params
    return out


def create(kind: str, name: str, /, **params: Any) -> Any:
    """Instantiate plugin ``name`` of ``kind`` with ``params``; unknown parameters are named in the error."""
    return check_params(kind, name, params)(**params)


def _parameters(obj: Any) -> dict[str, inspect.Parameter]:
    if inspect.isclass(obj) and obj.__init__ is object.__init__:
        return {}
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    return {k: p for k, p in sig.parameters.items() if k != "self"}


@dataclass
class PluginInfo:
    kind: str
    name: str
    params: dict[str, Any]
    doc: str
    source: str


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Every registered plugin (optionally of one kind), with parameters, defaults and one-line doc."""
    discover()
    out = []
    for k in KINDS if kind is None else [kind]:
        for name, obj in sorted(_REGISTRY[k].items()):
            params = {
                p: (None if v.default is inspect.Parameter.empty else v.default)
                for p, v in _parameters(obj).items()
                if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)
            }
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            out.append(PluginInfo(k, name, params, doc[0] if doc else "", _qualname(obj)))
    return out


def list_names(kind: str) -> list[str]:
    """Sorted names registered for ``kind`` (timm-style ``list_*`` helper)."""
    return [p.name for p in list_plugins(kind)]


# ------------------------------------------------------------------------------- defaults for Hydra
DEFAULTS_GROUP = "plugin_defaults"  # ConfigStore group of the constructor defaults (see store_defaults)
CONFIG_GROUPS = {"recorders": "recorders", "visualizers": "visualizers", "metrics": "metrics", "walkers": "walker"}


def param_defaults(cls: Any) -> dict[str, Any]:
    """A plugin's constructor defaults as config values (tuples as lists); parameters without a default, and
    defaults a config cannot hold, are left out (they are passed only when set)."""
    from omegaconf import OmegaConf

    out = {}
    for key, p in _parameters(cls).items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is inspect.Parameter.empty:
            continue
        value = list(p.default) if isinstance(p.default, tuple) else p.default
        try:
            OmegaConf.create({key: value})
        except Exception:
            continue
        out[key] = value
    return out


def store_defaults() -> None:
    """Every built-in and entry-point plugin's :func:`param_defaults` as Hydra's config node
    ``plugin_defaults/<kind>/<name>``; ``conf/<group>/<name>.yaml`` extends it, so its own body only selects
    the plugin (``_selected_: true``) and overrides. The one place a parameter's default is declared is the
    constructor."""
    from hydra.core.config_store import ConfigStore

    discover()
    store = ConfigStore.instance()
    for kind in CONFIG_GROUPS:
        for name, obj in _REGISTRY[kind].items():
            store.store(group=f"{DEFAULTS_GROUP}/{kind}", name=name, node=param_defaults(obj), provider="stablefused")
