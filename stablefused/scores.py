"""Which values of an image record are metric scores, decided by the metrics, not by a list of names.

Every image record lists the keys its metrics returned under ``metrics`` (:data:`METRICS_KEY`, written by
:meth:`stablefused.runs.Run.score`; ``[]`` when no metric ran), the values staying flat in the record
(``rec["shapes_adherence/mean"]``) as before. Manifests written before that list are still read: there a
number is a score unless it is one of the keys that say how an image was made (:data:`LEGACY_SETTINGS`).

A metric may also say which of its keys a task should summarise and what they mean:
``summaries() -> {record key: {"title": ..., "role": ...}}`` (e.g. img2img's strength trade-off draws those
keys, and a ``role`` pair ``edit``/``faithful`` gives the crossover strength)."""

from __future__ import annotations

from typing import Any, Iterable

METRICS_KEY = "metrics"
# Manifests without ``metrics`` lists: the record keys that describe how an image was made (not scores).
LEGACY_SETTINGS = frozenset({
    "type", "path", "index", "prompt", "negative_prompt", "seed", "guidance_scale", "steps", "scheduler", "sampler",
    "scheduler_class", "model", "height", "width", "guidance_schedule", "guidance_rule", "row", "col", "task",
    "strength", "frame", "time", "keyframe", "position", "init_image", "source", "resize", "mask", "mask_blur",
    "mask_box", "paste_back", "unet_channels", "eta", "batch_size"})


def record_metric_keys(rec: dict) -> list[str]:
    """The metric keys of one record: its ``metrics`` list, or (an older manifest) its numbers that are not
    settings."""
    listed = rec.get(METRICS_KEY)
    if isinstance(listed, list):
        return [k for k in listed if k in rec]
    return [k for k, v in rec.items() if k not in LEGACY_SETTINGS and not isinstance(v, bool)
            and (v is None or isinstance(v, (int, float)))]


def metric_keys(records: Iterable[dict]) -> list[str]:
    """Every metric key of ``records``, in first-seen order."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(record_metric_keys(r)))
    return list(keys)


def declared_summaries(metrics: Iterable[Any]) -> dict[str, dict]:
    """The keys the selected metric plugins ask a task to summarise (``summaries()``), with title and role."""
    out: dict[str, dict] = {}
    for m in metrics:
        if hasattr(m, "summaries"):
            out.update(m.summaries())
    return out
