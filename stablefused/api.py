"""The Python API (``import stablefused as sf``): the CLI's runs from a notebook, and the pieces under them.

High level — one call per experiment, the same config, checks, run dir and W&B run as ``python -m
stablefused`` with the same overrides (the CLI and :func:`run` share :func:`stablefused.app.run_job`)::

    res = sf.run("negative_guidance", seeds=[0], guidance_scales=[-5, 0, 5])   # experiment + overrides
    res = sf.run("guidance.rule=apg", task="txt2img", steps=10)                # Hydra override strings too
    res                      # in Jupyter: the grid, the table and the videos
    res.images, res.table, res.grid, res.videos, res.records, res.dir, res.config
    sf.load("runs/negative_guidance/2025-01-01_12-00-00")                      # a run dir, CLI's or not

Lower level — the same objects the CLI builds, built by hand::

    model = sf.load_model("shapes")                    # cached in the process: a second call costs nothing
    sampler = sf.sampler(model, "ddim")                # conf/scheduler/ddim.yaml on the model's config
    rule = sf.plugins.guidance_rule.apg(momentum=-0.5) # any registered plugin, parameters checked
    gen = sampler.txt2img(["a red circle on a black background"], [0], 7.5, steps=20,
                          guidance=sf.Guidance(sf.plugins.guidance_schedule.constant(), rule))
    sf.to_pil(gen.images), gen.latents
    res = sf.run("denoise_video", recorders=[sf.plugins.recorders.x0(every=2)], guidance=rule)  # a task

Errors a user can cause (a bad setting, an unknown option, a model that cannot load) are raised as
:class:`~stablefused.errors.ConfigError` (or the other :data:`~stablefused.errors.USER_ERRORS`) whose message is
the CLI's error lines, one per problem, every problem at once.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # the heavy imports (torch, diffusers, Hydra) wait for the first call
    import pandas
    from omegaconf import DictConfig
    from PIL import Image

    from stablefused.models import Components
    from stablefused.pipeline import Sampler

__all__ = ["run", "compose", "load", "Result", "ImageList", "Video", "load_model", "sampler", "plugins", "Guidance",
           "to_pil", "overrides_from"]

log = logging.getLogger("stablefused")

PLUGIN_GROUPS = ("recorders", "metrics", "visualizers")  # config groups that select several plugins
LOG_FILE = "app.log"  # the CLI's run log in the run dir (Hydra names it after the app module)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
EMBED_LIMIT = 50_000_000  # bytes: larger videos are shown as their path, not embedded in the notebook


# ------------------------------------------------------------------------------------------- overrides
_BARE = re.compile(r"[A-Za-z_][\w.\-/]*")


def _quoted(v: str) -> str:
    """``v`` inside single quotes in Hydra's grammar: a backslash escapes only a quote or the backslashes
    before one (or before the closing quote); ``${`` would be an interpolation, so it is escaped."""
    v = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", v)
    v = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, v)
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", v)  # OmegaConf's escape of an interpolation


def _value(v: Any) -> str:
    """``v`` in Hydra's override grammar (what one would type after ``key=`` on the command line)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        if _BARE.fullmatch(v) and v.lower() not in ("null", "true", "false", "nan", "inf"):
            return v
        return "'" + _quoted(v) + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    if type(v).__module__.startswith("numpy"):  # numpy scalars
        return _value(v.item())
    raise TypeError(f"{type(v).__name__} value {v!r}: cannot be written as a config value")


def _plugin_entry(kind: str, obj: Any) -> tuple[str, dict, Any]:
    """(name, parameters, object) of a plugin given to :func:`run` as a name, a ``{name: params}`` item or an
    object (from ``sf.plugins`` or constructed directly from a registered class)."""
    if isinstance(obj, str):
        return obj, {}, None
    name = getattr(obj, "plugin_name", None)
    if name is None or getattr(obj, "plugin_kind", None) != kind:
        raise TypeError(f"{kind}: {obj!r} is not a registered {kind} plugin; build it with sf.plugins.{kind}.<name>(...) "
                        f"or register its class with @stablefused.registry.register({kind!r}, name)")
    return name, dict(getattr(obj, "plugin_params", {}) or {}), obj


def overrides_from(*overrides: str, **settings: Any) -> tuple[list[str], dict[str, Any]]:
    """Hydra override strings for ``settings`` given as Python values (after the ``overrides`` given as strings),
    and the plugin objects among them (for :func:`stablefused.app.run`'s ``given``).

    ``key=value`` as on the command line; a dict on an ordinary key sets its sub-keys (``model={"path": p}`` is
    ``model.path=p``); ``recorders``/``metrics``/``visualizers`` take names, plugin objects or ``{name: params}``
    (the selection, then ``++<kind>.<name>.<param>=``); ``guidance`` takes an option name, a
    :class:`~stablefused.guidance.Guidance` or a rule/schedule object (objects of these kinds are used as they
    are); ``walker`` an option name or a walker from ``sf.plugins.walkers`` (the walk task builds its own from
    the same name and parameters); ``run_dir`` is ``hydra.run.dir``."""
    out = [str(o) for o in overrides]
    given: dict[str, Any] = {}
    for key, v in settings.items():
        if key == "run_dir":
            out.append(f"hydra.run.dir={_value(str(v))}")
        elif key in PLUGIN_GROUPS and not isinstance(v, str):
            items = list(v.items()) if isinstance(v, dict) else [(x, None) for x in ([] if v is None else v)]
            names = []
            for item, params in items:
                name, p, obj = _plugin_entry(key, item)
                names.append(name)
                if obj is not None:
                    given.setdefault(key, {})[name] = obj
                for k, x in {**p, **(params or {})}.items():
                    out.append(f"++{key}.{name}.{k}={_value(x)}")
            out.insert(len(out) - sum(1 for o in out if o.startswith(f"++{key}.")), f"{key}={_value(names)}")
        elif key == "guidance" and not isinstance(v, (str, dict)):
            from stablefused.guidance import Guidance

            if not isinstance(v, Guidance):  # a rule or a schedule alone
                kind = getattr(v, "plugin_kind", None)
                if kind not in ("guidance_rule", "guidance_schedule"):
                    raise TypeError(f"guidance: {v!r} is not a Guidance, a guidance_rule or a guidance_schedule plugin")
                sched = v if kind == "guidance_schedule" else _make("guidance_schedule", "constant", {})
                v = Guidance(sched, v if kind == "guidance_rule" else _make("guidance_rule", "cfg", {}))
            given["guidance"] = v
            for part, kind, key_params in ((v.schedule, "guidance_schedule", "params"),
                                           (v.rule, "guidance_rule", "rule_params")):
                name, p, _ = _plugin_entry(kind, part)
                out.append(f"guidance.{'schedule' if kind == 'guidance_schedule' else 'rule'}={name}")
                # exactly the object's parameters: the option's own are removed first (struct: no plain "=")
                out += [f"~guidance.{key_params}", f"+guidance.{key_params}={_value(p)}"]
        elif key == "walker" and not isinstance(v, (str, dict)):
            name, p, _ = _plugin_entry("walkers", v)
            if not hasattr(v, "plugin_params"):  # the walk task builds its walker from config: it needs them
                raise TypeError(f"walker: build it with sf.plugins.walkers.{name}(...) (its parameters go into the "
                                f"config), or pass walker={name!r} with walker.<param> settings")
            out.append(f"walker={name}")
            out += [f"walker.{k}={_value(x)}" for k, x in p.items()]
        elif isinstance(v, dict):
            out += [f"{key}.{k}={_value(x)}" for k, x in _flatten(v).items()]
        else:
            out.append(f"{key}={_value(v)}")
    return out, given


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------- compose
def _user_error(message: str) -> Exception:
    from stablefused.errors import ConfigError

    return ConfigError(message)


def compose(experiment: str | None = None, *overrides: str, **settings: Any) -> DictConfig:
    """The config ``python -m stablefused [experiment=<experiment>] <overrides>`` runs with (the ``hydra`` node
    included, resolved as the CLI resolves it). Bad overrides raise a ConfigError with the CLI's lines."""
    args, _ = overrides_from(*_with_experiment(experiment, overrides), **settings)
    return _compose(args)


def _with_experiment(experiment: str | None, overrides: Sequence[str]) -> list[str]:
    if experiment is not None and "=" in experiment:  # sf.run("steps=4") : an override, not a name
        return [experiment, *overrides]
    return ([f"experiment={experiment}"] if experiment else []) + list(overrides)


def _compose(args: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    from stablefused.app import override_problems
    from stablefused.paths import config_dir

    if any(a.startswith("-") for a in args):
        raise _user_error(f"{next(a for a in args if a.startswith('-'))}: a command-line flag; sf.run takes overrides "
                          "only (a sweep: call sf.run once per value)")
    if problems := override_problems(args):
        raise _user_error("\n".join(problems))
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="app"):
            cfg = hydra_compose("config", overrides=args, return_hydra_config=True)
    except HydraException as e:  # what the CLI prints, without the advice on HYDRA_FULL_ERROR
        raise _user_error(_hydra_message(e)) from None
    with open_dict(cfg):  # as hydra.main: the run dir resolved once (${now:...}), relative to the cwd
        cfg.hydra.run.dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
    return cfg


def _hydra_message(e: Exception) -> str:
    """What the CLI prints for a Hydra error (``hydra._internal.utils.run_and_report``): the message, and the
    OmegaConf error under it (``Key 'x' is not in struct``), without the stack trace."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(e)
    if isinstance(e.__cause__, OmegaConfBaseException):
        text += "\n" + str(e.__cause__)
    lines = [ln for ln in text.strip().splitlines() if "HYDRA_FULL_ERROR" not in ln]
    return "\n".join(lines).strip() or type(e).__name__


# ------------------------------------------------------------------------------------------- run
def run(experiment: str | None = None, *overrides: str, run_dir: str | Path | None = None, **settings: Any) -> Result:
    """Run an experiment as ``python -m stablefused`` does and return its :class:`Result`.

    ``experiment``: a ``conf/experiment`` name (or an override string); ``overrides``: Hydra override strings
    (``"guidance.rule=apg"``, ``"+guidance.rule_params.momentum=-0.5"``); ``settings``: the same as Python
    values (``seeds=[0, 1]``, ``prompts=["a red circle"]``, ``scheduler="ddim"``, ``logger="none"``) or plugin
    objects (see :func:`overrides_from`); ``run_dir``: where to write (default, as the CLI:
    ``runs/<name>/<timestamp>`` under the current directory). A run dir holding this config's finished run
    is not run again (its Result is returned); one holding an interrupted run continues (``resume``).

    The loaded model stays cached in this process: the next run on the same model does not load it again."""
    from omegaconf import OmegaConf, open_dict

    from stablefused import signals
    from stablefused.app import run_job
    from stablefused.errors import USER_ERRORS

    if run_dir is not None:
        settings["run_dir"] = run_dir
    args, given = overrides_from(*_with_experiment(experiment, overrides), **settings)
    cfg = _compose(args)
    hydra_node = cfg.hydra
    out = Path(os.path.abspath(str(hydra_node.run.dir)))  # as Hydra makes runtime.output_dir
    task_overrides = list(hydra_node.overrides.task)
    with open_dict(cfg):
        del cfg["hydra"]
    _save_hydra_files(out, cfg, hydra_node, task_overrides)
    try:
        with _grad_off(), _log_to(out / LOG_FILE):
            status, _ = run_job(cfg, out, overrides=task_overrides, given=given)
    except USER_ERRORS as e:  # the CLI's lines, raised from here: no traceback through the library
        raise e.with_traceback(None) from None
    except signals.Interrupted as e:  # Jupyter's "interrupt the kernel" (SIGINT), or SIGTERM
        raise KeyboardInterrupt(f"{e}: the images made so far are in {out}; sf.run with run_dir={str(out)!r} and "
                                "the same settings continues the run") from None
    OmegaConf.set_readonly(cfg, True)
    return Result(out, config=cfg, status=status)


def _save_hydra_files(run_dir: Path, cfg: DictConfig, hydra_node: Any, overrides: list[str]) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them for a CLI run (the
    sweep report and ``python -m stablefused report`` read them)."""
    from omegaconf import OmegaConf

    d = run_dir / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (d / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_node}))
    (d / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))


@contextmanager
def _grad_off() -> Iterator[None]:
    import torch

    with torch.no_grad():  # the CLI turns autograd off for the process; here only for the run
        yield


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """The run's INFO log into ``path`` (the CLI's ``app.log``), while the notebook sees what it saw before:
    warnings and errors (on stderr when nothing else is configured), not the INFO lines."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter(LOG_FORMAT))
    added = [file]
    root = logging.getLogger()
    if not root.handlers:  # logging.lastResort would stop printing warnings once a handler exists
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        added.append(stderr)
    level, quiet = log.level, _WarningsOnly()
    raised = log.getEffectiveLevel() > logging.INFO
    for h in added:
        log.addHandler(h)
    if raised:  # INFO for the file only: the handlers that saw no INFO lines before still see none
        log.setLevel(logging.INFO)
        for h in root.handlers:
            h.addFilter(quiet)
    try:
        yield
    finally:
        for h in added:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)
        if raised:
            for h in root.handlers:
                h.removeFilter(quiet)


class _WarningsOnly(logging.Filter):
    """Keep StableFused's INFO lines (raised for the log file) out of handlers that did not get them before."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("stablefused")


def load(run_dir: str | Path) -> Result:
    """The :class:`Result` of a run dir already on disk (a CLI run, a sweep job, an earlier ``sf.run``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no manifest.jsonl here (not a StableFused run dir)")
    return Result(run_dir)


# ------------------------------------------------------------------------------------------- results
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _img_tag(img: Image.Image, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(_png(img)).decode()}"{w}/>'


class ImageList(list):
    """The run's images (PIL, in index order) with their manifest rows in ``records`` (same order).
    ``where(guidance_scale=-5)`` picks by record values; in Jupyter it shows as a contact sheet."""

    def __init__(self, images: Sequence[Image.Image], records: Sequence[dict]):
        super().__init__(images)
        self.records = list(records)

    def where(self, **values: Any) -> ImageList:
        keep = [i for i, r in enumerate(self.records) if all(r.get(k) == v for k, v in values.items())]
        return ImageList([self[i] for i in keep], [self.records[i] for i in keep])

    def items(self) -> Iterator[tuple[Image.Image, dict]]:
        return zip(self, self.records)

    def sheet(self, cols: int | None = None) -> Image.Image | None:
        """All images in one picture, ``cols`` per row (default: a near-square sheet)."""
        from stablefused.outputs import grid

        if not self:
            return None
        cols = cols or max(1, math.ceil(math.sqrt(len(self))))
        rows = math.ceil(len(self) / cols)
        cells = list(self) + [None] * (rows * cols - len(self))
        return grid(cells, rows, cols, min_cell=96)

    def _repr_png_(self) -> bytes | None:
        sheet = self.sheet()
        return None if sheet is None else _png(sheet)

    def __repr__(self) -> str:
        return f"ImageList({len(self)} images)"


@dataclass
class Video:
    """A video the run wrote (``path``; its manifest row in ``record``); shown inline in Jupyter."""

    path: Path
    record: dict = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def _repr_html_(self) -> str:
        if self.path.stat().st_size > EMBED_LIMIT:  # a notebook holding a long walk's video would not open
            return f"<div>{html.escape(str(self.path))} ({self.path.stat().st_size / 1e6:.0f} MB: open the file)</div>"
        data = base64.b64encode(self.path.read_bytes()).decode()
        if self.path.suffix == ".gif":
            return f'<img src="data:image/gif;base64,{data}"/>'
        mime = {".mp4": "video/mp4", ".webm": "video/webm"}.get(self.path.suffix, "video/mp4")
        return f'<video controls loop autoplay muted playsinline src="data:{mime};base64,{data}"></video>'


class Result:
    """What a run wrote, read from its run dir (so it is the same for ``sf.run``, ``sf.load`` and CLI runs).

    ``dir``; ``config`` (the composed config); ``status`` (``status.json``); ``manifest`` (every record);
    ``images`` (:class:`ImageList`: PIL + manifest rows); ``table`` (pandas DataFrame: one row per image,
    settings and metrics); ``grid`` (``grid.png``) and ``grids`` (every grid by file name); ``videos``
    (:class:`Video` per MP4/GIF); ``records`` (the recorded tensors, :func:`stablefused.records.load`);
    ``stats`` (the run record: UNet rows, model calls, images, wall time); ``files`` (artifacts by type)."""

    def __init__(self, run_dir: str | Path, config: DictConfig | None = None, status: dict | None = None):
        self.dir = Path(run_dir)
        self._config = config
        self._status = status

    def __repr__(self) -> str:
        return f"Result({str(self.dir)!r}: {len(self._image_records)} {self.output_type}s, {len(self.videos)} videos)"

    @cached_property
    def config(self) -> DictConfig:
        if self._config is not None:
            return self._config
        from omegaconf import OmegaConf

        path = self.dir / ".hydra" / "config.yaml"
        return OmegaConf.load(path) if path.is_file() else OmegaConf.create({})

    @property
    def status(self) -> dict:
        from stablefused.sweeps import read_status

        return read_status(self.dir) if self._status is None else self._status

    @property
    def manifest(self) -> list[dict]:
        from stablefused.runs import read_records

        return read_records(self.dir / "manifest.jsonl")

    @property
    def output_type(self) -> str:
        """The manifest type of the run's images: ``image``, or a walk's ``frame``."""
        types = {r.get("type") for r in self.manifest}
        return "image" if "image" in types or "frame" not in types else "frame"

    @cached_property
    def _image_records(self) -> list[dict]:
        kind = self.output_type
        recs = [r for r in self.manifest if r.get("type") == kind and "index" in r]
        return sorted(recs, key=lambda r: (r["index"], r.get("frame", 0)))

    @cached_property
    def images(self) -> ImageList:
        from PIL import Image

        recs = self._image_records
        return ImageList([Image.open(self.dir / r["path"]).convert("RGB") for r in recs], recs)

    @cached_property
    def table(self) -> pandas.DataFrame:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Result.table needs pandas: pip install 'stablefused[notebook]' (or pip install pandas)") \
                from None

        df = pd.DataFrame(self._image_records)
        return df.set_index("index") if "index" in df else df

    def _artifacts(self, *kinds: str) -> list[dict]:
        return [r for r in self.manifest if r.get("type") in kinds and "index" not in r and r.get("path")]

    @property
    def files(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for r in self.manifest:
            if r.get("path") and r.get("type") not in ("image", "frame", "run"):
                out.setdefault(r["type"], []).append(self.dir / r["path"])
        return out

    @cached_property
    def grids(self) -> dict[str, Image.Image]:
        from PIL import Image

        return {r["path"]: Image.open(self.dir / r["path"]).convert("RGB") for r in self._artifacts("grid")}

    @property
    def grid(self) -> Image.Image | None:
        return self.grids.get("grid.png", next(iter(self.grids.values()), None))

    @property
    def videos(self) -> list[Video]:
        return [Video(self.dir / r["path"], r) for r in self.manifest
                if r.get("type") == "video" and Path(r["path"]).suffix in (".mp4", ".gif", ".webm")]

    @property
    def records(self) -> Any:
        from stablefused.records import load as load_records

        return load_records(self.dir)

    @property
    def stats(self) -> dict:
        runs = [r for r in self.manifest if r.get("type") == "run"]
        return runs[-1] if runs else {}

    def _repr_png_(self) -> bytes | None:
        g = self.grid
        return None if g is None else _png(g)

    def _repr_html_(self) -> str:
        s = self.stats
        head = (f"<b>{html.escape(str(self.dir))}</b>: {len(self._image_records)} {self.output_type}s"
                + (f", {s['wall_s']:g} s" if "wall_s" in s else ""))
        parts = [f"<div>{head}</div>"]
        if self.grid is not None:
            parts.append(_img_tag(self.grid, width=min(self.grid.width, 900)))
        parts += [v._repr_html_() for v in self.videos if v.path.is_file()]
        if self._image_records:
            parts.append(self.table.to_html(max_rows=12, max_cols=16))
        return "\n".join(parts)


# ------------------------------------------------------------------------------------------- lower level
def load_model(model: str = "shapes", *overrides: str, device: str | None = None, dtype: str | None = None,
               **settings: Any) -> Components:
    """The components (tokenizer, text encoder, UNet, VAE, scheduler config) of ``conf/model/<model>.yaml``
    with ``overrides`` (``"model.path=/models/sd15"``), loaded as a run loads them and cached in the process
    (the same cache: a later :func:`run` on this model does not load it again)."""
    from stablefused.errors import USER_ERRORS
    from stablefused.models import load_components

    extra = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    cfg = compose(None, f"model={model}", *overrides, **extra, **settings)
    try:
        return load_components(cfg.model, cfg.device, cfg.dtype)
    except USER_ERRORS as e:
        raise e.with_traceback(None) from None


def sampler(model: Components, scheduler: str = "default", **scheduler_overrides: Any) -> Sampler:
    """A :class:`~stablefused.pipeline.Sampler` on ``model`` with the scheduler of ``conf/scheduler/<scheduler>.yaml``
    (its class and overrides, then ``scheduler_overrides``), made fresh as each run makes it. Its
    ``txt2img(prompts, seeds, guidance_scales, steps=, guidance=, hooks=)`` and ``sample(...)`` run the one loop and
    return a :class:`~stablefused.pipeline.Generation` (``images``: float arrays, ``latents``, ``context``)."""
    from stablefused.pipeline import Sampler

    cfg = compose(None, f"scheduler={scheduler}").scheduler
    overrides = {**(cfg.get("overrides") or {}), **scheduler_overrides}
    return Sampler(model, model.make_scheduler(cfg.get("cls"), **overrides))


def to_pil(images: Any) -> list[Image.Image]:
    """Float images in [0, 1] (a Generation's ``images``, (B, H, W, 3)) as PIL images, rounded as runs save them."""
    from PIL import Image

    from stablefused.outputs import to_uint8

    images = getattr(images, "images", images)
    return [Image.fromarray(a) for a in to_uint8(images)]


def Guidance(schedule: Any = None, rule: Any = None) -> Any:  # noqa: N802 - reads like the class it returns
    """A :class:`stablefused.guidance.Guidance` (what the loop takes as ``guidance=``) from a schedule and a rule
    (plugin objects or names; default constant schedule, CFG rule)."""
    from stablefused.guidance import Guidance as _Guidance

    def part(kind: str, x: Any, default: str) -> Any:
        return _make(kind, x or default, {}) if x is None or isinstance(x, str) else x

    return _Guidance(part("guidance_schedule", schedule, "constant"), part("guidance_rule", rule, "cfg"))


def _make(kind: str, name: str, params: dict) -> Any:
    from stablefused import registry

    obj = registry.create(kind, name, **params)
    try:
        obj.plugin_params = dict(params)  # what sf.run writes into the config for this object
    except AttributeError:  # a plugin that is a function or has __slots__
        pass
    return obj


class _Kind:
    """``sf.plugins.<kind>``: one factory per registered plugin, ``sf.plugins.guidance_rule.apg(momentum=-0.5)``
    (parameters checked as config's are, the object remembers them for :func:`run`)."""

    def __init__(self, kind: str):
        self._kind = kind

    def __getattr__(self, name: str) -> Any:
        from stablefused import registry

        if name.startswith("_"):
            raise AttributeError(name)
        cls = registry.get(self._kind, name)  # an unknown name: PluginError with the closest one

        def factory(**params: Any) -> Any:
            return _make(self._kind, name, params)

        factory.__name__, factory.__doc__ = name, cls.__doc__
        return factory

    def __dir__(self) -> list[str]:
        from stablefused import registry

        return registry.list_names(self._kind)

    def __repr__(self) -> str:
        return f"sf.plugins.{self._kind}: {', '.join(self.__dir__())}"


class _Plugins:
    """``sf.plugins.<kind>.<name>(**params)`` for every plugin kind (``sf.plugins.list()``: all of them)."""

    def __getattr__(self, kind: str) -> _Kind:
        from stablefused import registry

        if kind not in registry.KINDS:
            raise AttributeError(f"sf.plugins has no kind {kind!r}; kinds: {', '.join(registry.KINDS)}")
        return _Kind(kind)

    def __dir__(self) -> list[str]:
        from stablefused import registry

        return [*registry.KINDS, "list"]

    def list(self, kind: str | None = None) -> Any:
        from stablefused import registry

        return registry.list_plugins(kind)


plugins = _Plugins()
