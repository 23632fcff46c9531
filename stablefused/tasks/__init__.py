"""Tasks: one file per task (``stablefused/tasks/<name>.py``), all on the one loop
(:func:`stablefused.sampling.denoise`), each registered by name and picked with ``task=<name>``.

A task's own settings live in ``conf/task/<name>.yaml`` (``# @package _global_``, so users type them at the
top level: ``task=img2img init_image=x.png strengths=[0.3,0.6]``). The keys of that file are the task's keys;
the task checks their values in :meth:`Task.validate`. Everything a task shares with the others (writing,
scoring, resuming, grids, W&B tables) is in :mod:`stablefused.runs`.

Writing a task::

    from stablefused.tasks import Task, register_task

    @register_task("my_task")
    class MyTask(Task):
        "One line shown by `python -m stablefused tasks`."

        def validate(self, cfg, problems):      # cheap checks, before the model loads
            if cfg.video_frames < 1:
                problems.append(f"video_frames={cfg.video_frames}: must be >= 1")

        def run(self, run):                     # cells -> run.generate(cells, make_batch) -> grids/plots
            ...

Third-party tasks register the same way from a module named by an entry point in the group
``stablefused.tasks``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from stablefused.errors import ConfigError

if TYPE_CHECKING:
    from stablefused.runs import Run

ENTRY_POINT_GROUP = "stablefused.tasks"
_TASKS: dict[str, type[Task]] = {}


class Task:
    """Base class: a task validates its own settings and runs into a :class:`~stablefused.runs.Run`."""

    name: str = ""
    output_type: str = "image"  # the manifest type of its one record per cell index (what resume keeps)
    # Types of the task's own settings where the default in conf/task/<name>.yaml cannot tell (null, or an
    # integer default of a setting that takes any number); the others take their default's type
    # (stablefused.config.declared_types). E.g. ``types = {"story": str | None, "fps": numbers.Real}``.
    types: dict[str, Any] = {}

    # settings naming input files (a file, a folder of them, or a list): their content is part of the run's
    # identity (stablefused.runs.fingerprint), so a rerun after a file changed is not taken for the same run
    input_settings: tuple[str, ...] = ()

    def input_files(self, cfg: Any, key: str) -> list:
        """The files setting ``key`` names (paths; not-yet-existing ones included), for the run's identity."""
        from pathlib import Path

        from stablefused.images import SHAPES_PREFIX, _specs

        out = []
        for spec in _specs(cfg.get(key)) if cfg.get(key) not in (None, "", []) else []:
            if spec.startswith(SHAPES_PREFIX):
                continue  # drawn from its description, which is in the config
            p = Path(spec).expanduser()
            out += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        return out

    def validate(self, cfg: Any, problems: list[str]) -> None:
        """Append one line per bad setting of this task (name the key and the fix). No model is loaded."""

    def image_count(self, cfg: Any) -> int | None:
        """Images the run will make, when the config alone tells (used to check sample indices and memory
        before loading); None when it depends on files or is unknown."""
        return None

    # True when an unset height/width comes from the task's input images (img2img, inpaint): the task checks
    # max_pixels itself against the size its inputs give (config checks the model's default size otherwise).
    size_from_inputs: bool = False

    # True when the task's text-to-image batches can hand over to an SDXL refiner (``model.refiner``,
    # :func:`stablefused.families.sdxl.txt2img_refined`); other tasks refuse that setting before loading.
    refiner: bool = False

    def frames_per_output(self, cfg: Any) -> int:
        """Images of height x width in one output (a video's frames): what max_pixels counts per batch item."""
        return 1

    def run(self, run: Run) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        if name in _TASKS and _TASKS[name] is not cls and _TASKS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} is registered twice: {_TASKS[name]} and {cls}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


@cache
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as ``name`` (a ``ConfigError`` naming the closest one)."""
    if name not in _TASKS:
        try:  # the built-in task of that name, without importing the others
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            pass
    if name not in _TASKS:
        _discover()
    if name not in _TASKS:
        import difflib

        close = difflib.get_close_matches(str(name), list(_TASKS), n=1)
        hint = f" Did you mean task={close[0]}?" if close else ""
        raise ConfigError(f"task={name}: unknown task.{hint} Tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


def task_names() -> list[str]:
    _discover()
    return sorted(_TASKS)
