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

__all__ = ["PluginError", "register", "get", "create", "check_params", "discover", "list_plugins", "list_names"]

KINDS = (
    "guidance_schedule",
    "guidance_rule",
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
    """Import every ``<kind>/<name>.py`` below ``folder`` (once per folder)."""
    folder = Path(folder).resolve()
    if folder in _loaded_dirs:
        return
    if not folder.is_dir():
        raise PluginError(f"plugin_dirs: {folder} is not a folder")
    _loaded_dirs.add(folder)
    for file in sorted(folder.glob("*/*.py")):
        if file.name.startswith("_"):
            continue
        kind = file.parent.name
        prefix = "stablefused_plugins" if folder == builtin_plugins_dir().resolve() else f"stablefused_user_plugins_{len(_loaded_dirs)}"
        mod_name = f"{prefix}.{kind}.{file.stem}"
        if kind == "__pycache__" or mod_name in sys.modules:
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


def discover(extra_dirs: list[str | Path] = ()) -> None:
    """Load built-in plugins, entry points and any extra folders."""
    load_plugin_dir(builtin_plugins_dir())
    _load_entry_points()
    for d in extra_dirs:
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
    """The plugin class for ``name``, after checking that it accepts every key of ``params``."""
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
    return cls


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
