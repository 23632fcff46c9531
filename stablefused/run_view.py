"""What plugins see of a run once its images are made (a recorder's ``save``, a visualizer's ``__call__``):
a :class:`RunView`, not the :class:`~stablefused.runs.Run` itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stablefused.runs import image_size


class RunView:
    """A run's settings (``cfg``, read them, don't change them), image ``records`` and ``images`` (same
    order), the ``recorders`` (their tensors: :func:`stablefused.records.from_run`), the ``sampler`` (to
    decode latents: :mod:`stablefused.preview`), the ``tokenizer``, ``image_size`` (height, width), the
    ``logger`` (W&B), and the run dir's files: ``path(*parts)`` and ``add_artifact(path, kind, caption=,
    log_key=, **record keys)``.

    Not the task, the guidance, the other plugins or the run's bookkeeping (manifest, counters, resume
    state). One view per run, shared by its plugins (the recorders' saved tensors are kept on it)."""

    def __init__(self, run: Any):
        self._run = run
        self.cfg, self.run_dir, self.recorders = run.cfg, run.run_dir, run.recorders
        self.sampler, self.logger = run.sampler, run.logger
        self.tokenizer = run.components.tokenizer
        self.image_size = image_size(run.cfg)

    @property
    def records(self) -> list[dict]:
        return self._run.records

    @property
    def images(self) -> list:
        return self._run.images

    def path(self, *parts: str) -> Path:
        return self._run.path(*parts)

    def add_artifact(self, path: Path, kind: str, caption: str | None = None, log_key: str | None = None,
                     **extra: Any) -> None:
        self._run.add_artifact(path, kind, caption=caption, log_key=log_key, **extra)
