"""Step records: what the ``recorders`` plugins keep of the denoising loop, how it is saved, how to load it.

A run with recorders writes two files into its run dir:

* ``records.safetensors``: every recorded tensor (on CPU, in the recorder's storage ``dtype``);
* ``records.json``: a small index: per tensor its recorder, dims and shape; per recorder the recorded steps,
  their timesteps ``t`` and noise levels ``sigma`` and the recorded samples (global sample indices); and the
  metadata of every recorded sample (prompt, seed, guidance scale, grid row/col).

Load them in a notebook with one call::

    from stablefused.records import load
    rec = load("runs/denoise_video/2025-01-01_12-00-00")
    rec["x0"].shape          # (samples, steps, C, H, W)
    rec.steps("x0"), rec.t("x0"), rec.sigma("x0")   # what the step axis means
    rec.samples("x0")        # [{index, prompt, seed, guidance_scale, row, col}, ...] in the sample axis order
    rec.stats["guidance_delta_norm"]                  # (samples, steps), with recorders=[stats]

Tensor names and layout (``N`` recorded samples, ``S`` recorded steps):

=====================  ===========================  ==========================================================
name                   recorder                     shape / meaning
=====================  ===========================  ==========================================================
``x_t``, ``x_prev``    ``latents``                  (N, S, C, H, W): latents entering / leaving the step
``x0``                 ``x0``                       (N, S, C, H, W): predicted clean latents x̂0
``eps_cond`` ...       ``noise``                    (N, S, C, H, W): ``eps_cond``, ``eps_uncond``, ``eps_guided``
``stats.<name>``       ``stats``                    (N, S): per-step statistics (see the ``stats`` recorder)
``attention``          ``attention``                (N, T, H, W): cross-attention per prompt token
=====================  ===========================  ==========================================================

**Steps, and 2nd-order schedulers.** The loop calls hooks once per UNet evaluation; Heun, KDPM2 and
DPM-SDE evaluate the UNet twice per scheduler step (their ``timesteps`` repeat). With ``per: step`` (the
default) a recorder keeps one entry per *scheduler step*: ``x_t``, ``t``, ``sigma``, the predictions and x̂0 of
the step's first (predictor) evaluation, and ``x_prev`` after the step's last (corrector) evaluation, i.e. the
latents the step ends on. ``per: call`` records every UNet evaluation as the loop reports it (then the step
axis counts calls and an entry's ``x_t`` may be a predictor's intermediate point). Recorders keep every k-th
step (``every``: steps 0, k, 2k, ...) and always the last one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from stablefused.hooks import BaseHook, LoopContext, StepState
from stablefused.errors import PluginError

TENSORS_FILE = "records.safetensors"
INDEX_FILE = "records.json"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}


# ---------------------------------------------------------------------------------------------- loading
class Records(Mapping):
    """Recorded tensors of one run (a mapping name → CPU tensor) with the index that says what they are."""

    def __init__(self, tensors: dict[str, torch.Tensor], index: dict):
        self.tensors, self.index = tensors, index

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.tensors.items())
        return f"Records({body})"

    def info(self, key: str) -> dict:
        """The index entry of the recorder that produced tensor ``key`` (steps, t, sigma, samples, ...)."""
        rec = self.index["tensors"][key]["recorder"]
        return self.index["recorders"][rec]

    def steps(self, key: str) -> list[int]:
        return list(self.info(key)["steps"])

    def t(self, key: str) -> list[float]:
        return list(self.info(key)["t"])

    def sigma(self, key: str) -> list[float]:
        return list(self.info(key)["sigma"])

    def samples(self, key: str) -> list[dict]:
        """Metadata of the samples along dim 0 of ``key``, in that order."""
        meta = self.index.get("samples", {})
        return [meta.get(str(i), {"index": i}) for i in self.info(key)["samples"]]

    def position(self, key: str, index: int) -> int:
        """Position along dim 0 of ``key`` of the sample with global index ``index``."""
        return list(self.info(key)["samples"]).index(int(index))

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """``stats.<name>`` tensors by ``<name>`` (each (samples, steps))."""
        return {k[len("stats."):]: v for k, v in self.tensors.items() if k.startswith("stats.")}


def load(run_dir: str | Path) -> Records:
    """Load ``records.safetensors`` + ``records.json`` from a run dir (or either file's path)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    index_path = run_dir / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no records here; run with recorders=[...] (e.g. recorders=[x0,stats])")
    index = json.loads(index_path.read_text())
    return Records(load_file(str(run_dir / TENSORS_FILE)), index)


def from_run(run: Any) -> Records:
    """The records of a run still in memory (what visualizers use): same API as :func:`load`."""
    state = run.__dict__.get("_records")
    if state is None:  # recorders not saved yet (or saved elsewhere): collect them now
        state = {"tensors": {}, "index": _empty_index(run)}
        for name, rec in run.recorders.items():
            if hasattr(rec, "result"):
                _merge(state, name, rec, run)
    return Records(state["tensors"], state["index"])


# ---------------------------------------------------------------------------------------------- saving
def _empty_index(run: Any) -> dict:
    cfg = run.cfg
    return {
        "version": FORMAT_VERSION, "model": str(cfg.model.name), "scheduler": str(cfg.scheduler.name),
        "scheduler_class": type(run.sampler.scheduler).__name__, "steps": int(cfg.steps),
        "height": run.records[0]["height"] if run.records else None,
        "width": run.records[0]["width"] if run.records else None,
        "tensors": {}, "recorders": {}, "samples": {},
    }


def _merge(state: dict, name: str, recorder: Any, run: Any) -> None:
    tensors, info = recorder.result(run)
    # steps are counted from the loop's first step; an img2img loop starts at start_step of the schedule
    info.setdefault("start_step", getattr(getattr(recorder, "tracker", None), "start_step", 0))
    state["index"]["recorders"][name] = info
    for key, (tensor, dims) in tensors.items():
        state["tensors"][key] = tensor.contiguous()
        state["index"]["tensors"][key] = {"recorder": name, "dims": list(dims), "shape": list(tensor.shape),
                                          "dtype": str(tensor.dtype).replace("torch.", "")}
    by_index = {int(r["index"]): r for r in run.records}
    for i in info.get("samples", []):
        r = by_index.get(int(i), {"index": int(i)})
        state["index"]["samples"][str(i)] = {k: r.get(k) for k in
                                             ("index", "prompt", "seed", "guidance_scale", "row", "col", "path")
                                             if k in r}


def save_recorder(run: Any, name: str, recorder: Any) -> list[Path]:
    """Add one recorder's tensors to the run's ``records.safetensors`` / ``records.json`` (rewritten whole,
    so that every recorder of the run ends up in the same two files); list them in the manifest once."""
    from safetensors.torch import save_file

    state = run.__dict__.setdefault("_records", {"tensors": {}, "index": _empty_index(run), "listed": False})
    _merge(state, name, recorder, run)
    tensors_path, index_path = run.path(TENSORS_FILE), run.path(INDEX_FILE)
    save_file(state["tensors"], str(tensors_path), metadata={"format": "stablefused-records",
                                                            "version": str(FORMAT_VERSION)})
    index_path.write_text(json.dumps(state["index"], indent=1))
    if not state["listed"]:
        state["listed"] = True
        run.add_artifact(tensors_path, "file", caption="recorded tensors: stablefused.records.load(run_dir)")
        run.add_artifact(index_path, "file", caption="index of records.safetensors")
    return [tensors_path, index_path]


def recorder_name(obj: Any) -> str:
    return getattr(obj, "plugin_name", type(obj).__name__)


# ---------------------------------------------------------------------------------------------- resume
# Records survive an interrupt as the images do: after each batch, every recorder's new chunks are written to
# ``records.parts/<recorder>/<first sample index>.safetensors`` (with the batch's PNGs, before its manifest
# lines). A resumed run reads back the parts of the images it keeps, so its records (and the visualizers made
# from them) equal an uninterrupted run's. A recorder takes part by keeping ``_chunks``: a list of tuples
# ``(global sample indices, payload...)``, each payload a tensor or a dict of tensors whose dim 0 holds those
# samples in that order (so a part can be cut to the samples a resumed run keeps), and naming in
# ``RESUME_STATE`` the attributes (dotted paths, JSON values) that describe its recording (steps, layers).
PARTS_DIR = "records.parts"


def _resumable(recorder: Any) -> bool:
    return isinstance(getattr(recorder, "_chunks", None), list)


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def _write_part(path: Path, indices: list[int], payload: tuple, state: dict) -> Path:
    from safetensors.torch import save_file

    tensors, layout = {}, []
    for k, item in enumerate(payload):
        if isinstance(item, dict):
            layout.append(list(item))
            tensors.update({f"{k}.{key}": t.contiguous() for key, t in item.items()})
        else:
            layout.append(None)
            tensors[str(k)] = item.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"indices": json.dumps([int(i) for i in indices]),
                                           "layout": json.dumps(layout), "state": json.dumps(state)})
    tmp.replace(path)
    return path


def save_parts(run: Any) -> list[Path]:
    """Write the chunks each recorder added since the last call (see :data:`PARTS_DIR`); atomic per file."""
    written = []
    for name, recorder in run.recorders.items():
        if not _resumable(recorder):
            continue
        state = {k: _get(recorder, k) for k in getattr(recorder, "RESUME_STATE", ())}
        for indices, *payload in recorder._chunks[recorder.__dict__.get("_parts_saved", 0):]:
            path = run.run_dir / PARTS_DIR / name / f"{min(indices):06d}.safetensors"
            written.append(_write_part(path, indices, tuple(payload), state))
        recorder._parts_saved = len(recorder._chunks)
    return written


def _read_part(path: Path) -> tuple[list[int], tuple, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        indices, layout, state = (json.loads(meta[k]) for k in ("indices", "layout", "state"))
        payload = tuple({key: f.get_tensor(f"{k}.{key}") for key in keys} if keys is not None else f.get_tensor(str(k))
                        for k, keys in enumerate(layout))
    return [int(i) for i in indices], payload, state


def _rows(payload: tuple, rows: list[int]) -> tuple:
    """The payload's rows ``rows`` (dim 0 of every tensor is the chunk's samples, in its indices' order)."""
    pick = torch.tensor(rows, dtype=torch.long)
    return tuple({k: t.index_select(0, pick) for k, t in item.items()} if isinstance(item, dict)
                 else item.index_select(0, pick) for item in payload)


def restore_parts(run: Any, kept: set[int]) -> set[int]:
    """Give each recorder back the rows of its parts that belong to kept samples (``kept``: indices whose
    image a resumed run keeps), rewrite a part that also held samples made again with just the kept rows, and
    delete the rest. Returns the kept indices a recorder wanted but has no readable part for (a run dir from
    before parts existed, a part cut short by a kill): the run makes those again."""
    root = Path(run.run_dir) / PARTS_DIR
    recorders = {n: r for n, r in run.recorders.items() if _resumable(r)}
    parts: dict[str, list] = {}
    for name in recorders:
        parts[name] = []
        for path in sorted((root / name).glob("*.safetensors")) if (root / name).is_dir() else []:
            try:
                parts[name].append((path, *_read_part(path)))
            except Exception:  # cut short or unreadable: its images are made again
                path.unlink()
    missing = set()
    for name, recorder in recorders.items():
        covered = {i for _, idx, _, _ in parts[name] for i in idx}
        wanted = getattr(recorder, "samples", None)
        missing |= {i for i in kept if (wanted is None or i in wanted) and i not in covered}
    good = set(kept) - missing
    for name, recorder in recorders.items():
        for path, indices, payload, state in parts[name]:
            rows = [k for k, i in enumerate(indices) if i in good]
            if len(rows) < len(indices):  # samples made again: their rows go, the kept ones stay
                path.unlink()
                if not rows:
                    continue
                indices, payload = [indices[k] for k in rows], _rows(payload, rows)
                _write_part(root / name / f"{min(indices):06d}.safetensors", indices, payload, state)
            recorder._chunks.append((indices, *payload))
            for key, value in state.items():
                if _get(recorder, key) in (None, []) and value not in (None, []):
                    _set(recorder, key, value)
        recorder._parts_saved = len(recorder._chunks)
    for path in root.glob("*/*.tmp") if root.is_dir() else []:
        path.unlink()
    return missing


# ---------------------------------------------------------------------------------------------- recording
class StepTracker:
    """Groups loop iterations (UNet calls) into scheduler steps (see the module doc), and picks samples.

    ``observe(state)`` returns ``(step, starts)``: the scheduler step this call belongs to and whether the
    call started it. A call starts a step when the previous call completed one; after ``scheduler.step`` a
    2nd-order scheduler reports ``state_in_first_order`` False while it waits for its corrector call.
    """

    def __init__(self, per: str = "step"):
        if per not in ("step", "call"):
            raise PluginError(f"per={per!r}: must be step (one entry per scheduler step) or call (per UNet call)")
        self.per = per
        self.scheduler = None
        self.step = -1
        self._completed = True

    def reset(self, ctx: LoopContext) -> None:
        self.scheduler, self.step, self._completed = ctx.scheduler, -1, True
        self.timesteps = [float(t) for t in ctx.timesteps.detach().cpu()]  # once, not a device sync per step
        # schedule steps skipped before the loop (img2img's start_step): counted in calls for per=call
        skipped = len(getattr(ctx.scheduler, "timesteps", ctx.timesteps)) - len(ctx.timesteps)
        self.start_step = skipped if self.per == "call" else skipped // max(1, int(getattr(ctx.scheduler, "order", 1)))

    def t(self, state: StepState) -> float:
        return self.timesteps[state.index] if state.index < len(self.timesteps) else float(state.t)

    def observe(self, state: StepState) -> tuple[int, bool]:
        if self.per == "call":
            self.step = state.index
            return state.index, True
        starts = self._completed
        self._completed = bool(getattr(self.scheduler, "state_in_first_order", True))
        if starts:
            self.step += 1
        return self.step, starts

    def next_call_starts_step(self) -> bool:
        return self.per == "call" or self._completed


def sample_rows(ctx: LoopContext, offset: int, wanted: list[int] | None) -> tuple[list[int], list[int]]:
    """Global sample indices of this batch's rows, and the batch rows to keep (``wanted``: global indices)."""
    batch = ctx.latents.shape[0]
    if ctx.samples:
        indices = [int(s["index"]) for s in ctx.samples]
    else:
        indices = list(range(offset, offset + batch))
    keep = list(range(batch)) if wanted is None else [k for k, i in enumerate(indices) if i in wanted]
    return indices, keep


def _check_samples(samples: Any) -> list[int] | None:
    if samples is None:
        return None
    if isinstance(samples, int) and not isinstance(samples, bool):
        return [samples]
    try:
        return [int(s) for s in samples]
    except (TypeError, ValueError):
        raise PluginError(f"samples={samples!r}: must be null (all) or a list of sample indices") from None


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise PluginError(f"every={every!r}: must be an integer >= 1")
    return every


def _check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype not in STORAGE_DTYPES:
        raise PluginError(f"dtype={dtype!r}: must be float16, bfloat16, float32 or null (as computed)")
    return STORAGE_DTYPES[dtype]


class SelectedSteps(BaseHook):
    """What every recorder shares: every k-th step (``every``, and always the last) of the chosen samples
    (``samples``: global indices across the batches of a run), one entry per step or per call (``per``)."""

    ranges = {"every": (1, None), "samples": (0, None), "steps": (0, None)}  # checked at config validation
    RESUME_STATE = ("_steps", "tracker.start_step")  # what a resumed run needs besides the chunks

    run_params = {"samples": "images", "every": "every"}  # registry.run_problems

    def __init__(self, every: int = 1, samples: list[int] | int | None = None, per: Literal["step", "call"] = "step"):
        self.every = _check_every(every)
        self.samples = _check_samples(samples)
        self.tracker = StepTracker(per)
        self._offset = 0
        self._chunks: list = []  # per batch: (global indices, what was recorded)
        self._steps: list[dict] | None = None

    def before_loop(self, ctx: LoopContext) -> None:
        self.tracker.reset(ctx)
        indices, keep = sample_rows(ctx, self._offset, self.samples)
        self._offset += ctx.latents.shape[0]
        self._indices = [indices[k] for k in keep]
        self._keep = None if len(keep) == ctx.latents.shape[0] else torch.tensor(keep, device=ctx.latents.device)


class TensorRecorder(SelectedSteps):
    """Base of the tensor recorders: keeps ``FIELDS`` (record name → StepState attribute) of every k-th step
    for the chosen samples, copied to CPU in the storage dtype as they are recorded.

    ``LAST_CALL`` names fields taken from the step's last UNet call (``x_prev``); the others come from its
    first call (see the module doc on 2nd-order schedulers).
    """

    FIELDS: dict[str, str] = {}
    LAST_CALL: tuple[str, ...] = ("x_prev",)

    def __init__(self, every: int = 1, samples: list[int] | int | None = None,
                 dtype: Literal["float16", "bfloat16", "float32"] | None = "float16", per: Literal["step", "call"] = "step"):
        super().__init__(every, samples, per)
        self.dtype = _check_dtype(dtype)

    # -- hook
    def before_loop(self, ctx: LoopContext) -> None:
        super().before_loop(ctx)
        self._entries: list[dict] = []
        self._pending: dict | None = None  # the newest step when it is not an every-k step (kept if last)

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        if self._keep is not None:
            x = x.index_select(0, self._keep)
        return x.detach().to(device="cpu", dtype=self.dtype or x.dtype, copy=True)

    def on_step(self, state: StepState) -> None:
        if not self._indices:
            return None
        step, starts = self.tracker.observe(state)
        if starts:
            if self._pending is not None:  # the previous step was neither every-k nor last: drop it
                self._pending = None
            entry = {"step": step, "t": self.tracker.t(state), "sigma": float(state.sigma), "raw": {}}
            recorded = step % self.every == 0
            for name, attr in self.FIELDS.items():
                value = getattr(state, attr)
                entry["raw"][name] = self._copy(value) if recorded else value
            if recorded:
                self._entries.append(entry)
            else:
                self._pending = entry
        else:  # corrector call of a 2nd-order step: update what the step ends on
            entry = self._pending or self._entries[-1]
            for name in self.LAST_CALL:
                if name in self.FIELDS:
                    value = getattr(state, self.FIELDS[name])
                    entry["raw"][name] = value if entry is self._pending else self._copy(value)
        return None

    def after_loop(self, ctx: LoopContext, latents: torch.Tensor) -> None:
        if not self._indices:
            return
        if self._pending is not None:  # always keep the last step
            self._entries.append({**self._pending, "raw": {k: self._copy(v) for k, v in self._pending["raw"].items()}})
            self._pending = None
        steps = [{"step": e["step"], "t": e["t"], "sigma": e["sigma"]} for e in self._entries]
        if self._steps is None:
            self._steps = steps
        elif [s["step"] for s in steps] != [s["step"] for s in self._steps]:
            raise RuntimeError(f"{recorder_name(self)} recorder: batches of one run recorded different steps")
        stacked = {name: torch.stack([e["raw"][name] for e in self._entries], dim=1) for name in self.FIELDS}
        self._chunks.append((self._indices, stacked))
        self._entries = []

    # -- results
    def result(self, run: Any = None) -> tuple[dict[str, tuple[torch.Tensor, tuple[str, ...]]], dict]:
        """``({name: (tensor (N, S, ...), dims)}, info)`` in global sample order."""
        indices = [i for idx, _ in self._chunks for i in idx]
        order = sorted(range(len(indices)), key=indices.__getitem__)
        tensors = {}
        for name in self.FIELDS:
            parts = [c[name] for _, c in self._chunks]
            if not parts:
                continue
            t = torch.cat(parts)[order] if len(parts) > 1 or order != list(range(len(order))) else parts[0]
            dims = ("sample", "step") + (("channel", "frame", "height", "width") if t.ndim == 6
                                         else ("channel", "height", "width"))
            tensors[name] = (t, dims)
        steps = self._steps or []
        info = {
            "kind": "tensors", "per": self.tracker.per, "every": self.every,
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
            "steps": [s["step"] for s in steps], "t": [s["t"] for s in steps], "sigma": [s["sigma"] for s in steps],
            "samples": sorted(indices), "fields": list(self.FIELDS),
        }
        return tensors, info

    def save(self, run: Any) -> list[Path]:
        return save_recorder(run, recorder_name(self), self)


def check_requirements(cfg: Any) -> None:
    """Raise :class:`PluginError` (one line naming the fix) when a selected visualizer needs recorders that
    are not selected. Visualizer classes declare ``requires(params) -> list[str]`` (recorder names)."""
    from stablefused import registry

    selected = set(registry.selected(cfg, "recorders"))
    for name, params in registry.selected(cfg, "visualizers").items():
        cls = registry.get("visualizers", name)
        if not hasattr(cls, "requires") or registry.param_problems(cls, dict(params or {})):
            continue  # bad parameter values are reported by config validation, one line each
        need = list(cls.requires(dict(params or {})))
        missing = [r for r in need if r not in selected]
        if missing:
            raise PluginError(missing_message(name, need, selected))


def missing_message(visualizer: str, need: list[str], selected: set[str]) -> str:
    together = list(dict.fromkeys([*sorted(selected), *need]))
    return (f"visualizers.{visualizer} needs recorders=[{','.join(need)}]; "
            f"select them, e.g. recorders=[{','.join(together)}]")


def require(run: Any, visualizer: str, need: list[str]) -> None:
    """Raise the same one-line error as :func:`check_requirements` from inside a visualizer."""
    missing = [r for r in need if r not in run.recorders]
    if missing:
        raise PluginError(missing_message(visualizer, need, set(run.recorders)))
