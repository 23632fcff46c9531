"""Weights & Biases logging (``logger=wandb``, offline unless ``WANDB_MODE`` says otherwise) or nothing
(``logger=none``). Images go as uint8 (W&B renders float images black); videos as mp4 file paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class NullLogger:
    """``logger=none``: every call does nothing."""

    run = None

    def image(self, key: str, image: Any, caption: str | None = None) -> None: ...
    def images(self, key: str, images: Sequence[Any], captions: Sequence[str]) -> None: ...
    def video(self, key: str, path: Path, caption: str | None = None, fps: int | None = None) -> None: ...
    def table(self, key: str, columns: list[str], rows: list[list]) -> None: ...
    def line_plot(self, key: str, columns: list[str], rows: list[list], x: str, y: str, title: str) -> None: ...
    def line_series(self, key: str, xs: list, ys: list[list], keys: list[str], title: str, xname: str) -> None: ...
    def metrics(self, values: dict, step_metric: str | None = None) -> None: ...
    def summary(self, values: dict) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


# W&B reads these from the environment when it stages a file (no Settings field): the copies of a logged
# table's images and its JSON go to $WANDB_DATA_DIR/artifacts/staging, by default in the user's home.
RUN_LOCAL_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}


class WandbLogger(NullLogger):
    """One W&B run per StableFused run; sweep jobs share a group, ``job_type`` = experiment name.

    Everything the run's records point to lives in its own folder (``wandb/offline-run-*/``): while the
    run is open, W&B's data (artifact staging) and artifact dirs are that folder's ``data/`` and
    ``artifacts/``, so copying the folder elsewhere and ``wandb sync``-ing it keeps the table's pictures.
    The environment is restored at ``finish``, so sweep jobs in one process do not share or leak them.
    """

    def __init__(self, cfg: Any, config: dict, run_dir: Path, name: str, group: str | None, job_type: str):
        import wandb

        self.wandb = wandb
        mode, _ = resolve_mode(cfg)
        self.run = wandb.init(
            project=cfg.get("project") or "stablefused", entity=cfg.get("entity"), dir=str(run_dir),
            name=name, group=group, job_type=job_type, config=config, tags=list(cfg.get("tags") or []),
            mode=mode, reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, init_timeout=60),
        )
        self._saved_env = {k: os.environ.get(k) for k in RUN_LOCAL_DIRS}
        sync_dir = Path(self.run.settings.sync_dir)
        for key, sub in RUN_LOCAL_DIRS.items():
            os.environ[key] = str(sync_dir / sub)
        self._defined: set[str] = set()

    def _img(self, image: Any, caption: str | None) -> Any:
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            raise TypeError("log images as uint8 (float images render black in W&B)")
        return self.wandb.Image(image, caption=caption)

    def image(self, key, image, caption=None):
        self.run.log({key: self._img(image, caption)})

    def images(self, key, images, captions):
        self.run.log({key: [self._img(i, c) for i, c in zip(images, captions)]})

    def video(self, key, path, caption=None, fps=None):
        self.run.log({key: self.wandb.Video(str(path), caption=caption, format=Path(path).suffix.lstrip("."))})

    def table(self, key, columns, rows):
        rows = [[self._img(v, None) if _is_image(v) else v for v in r] for r in rows]
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def line_plot(self, key, columns, rows, x, y, title):
        table = self.wandb.Table(columns=columns, data=rows)
        self.run.log({key: self.wandb.plot.line(table, x, y, title=title)})

    def line_series(self, key, xs, ys, keys, title, xname):
        """One chart with a line per key (``wandb.plot.line_series``); ``None`` in ``ys`` is a gap."""
        self.run.log({key: self.wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname=xname)})

    def metrics(self, values, step_metric=None):
        if step_metric:
            if step_metric not in self._defined:
                self.run.define_metric(step_metric)
                self._defined.add(step_metric)
            for k in values:
                if k != step_metric and k not in self._defined:
                    self.run.define_metric(k, step_metric=step_metric)
                    self._defined.add(k)
        self.run.log(values)

    def summary(self, values):
        self.run.summary.update(values)

    def finish(self, exit_code=0):
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        finally:
            self.run = None
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _is_image(v: Any) -> bool:
    from PIL import Image

    return isinstance(v, Image.Image) or (isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 3)


def has_credentials() -> bool:
    """A W&B API key is at hand: ``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc (or $NETRC) for the
    W&B host. Nothing is contacted."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(cfg: Any) -> tuple[str, str | None]:
    """The W&B mode a run uses, and a one-line note when it is not the one asked for: ``logger.mode``, else
    ``$WANDB_MODE``, else offline; an online mode without credentials stays offline (said in the note)."""
    asked = cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    where = "logger.mode" if cfg.get("mode") else "WANDB_MODE"
    if asked in ("online", "run", "shared") and not has_credentials():
        return "offline", (f"{where}={asked}: no W&B credentials (WANDB_API_KEY or `wandb login`); logging offline "
                           "instead (upload later with `wandb sync <run dir>/wandb/offline-run-*`)")
    return asked, None


def make_logger(cfg: Any, config: dict, run_dir: Path, name: str, group: str | None, job_type: str) -> NullLogger:
    if cfg.name == "none":
        return NullLogger()
    return WandbLogger(cfg, config, run_dir, name, group, job_type)
