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

    def validate(self, cfg: Any, problems: list[str]) -> None:
        """Append one line per bad setting of this task (name the key and the fix). No model is loaded."""

    def image_count(self, cfg: Any) -> int | None:
        """Images the run will make, when the config alone tells (used to check sample indices and memory
        before loading); None when it depends on files or is unknown."""
        return None

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
