"""``task=guidance_grid``: the same prompts and seeds under several guidance variants (schedule + rule).

The variants come from ``guidance.grid`` (``conf/guidance/schedules.yaml``, ``conf/guidance/rules.yaml``);
each may set ``label``, ``schedule``, ``params``, ``rule``, ``rule_params``, and takes what it leaves out
from the guidance group's own keys (``params``/``rule_params`` only when it keeps the same schedule/rule).
Without ``guidance.grid`` the run has one variant, the guidance group itself, so a Hydra sweep
(``-m guidance=constant,linear``) gives one single-column run per job.

Every variant runs through the one loop (:func:`stablefused.sampling.denoise` via the sampler) with its own
fresh :class:`~stablefused.guidance.Guidance`; images of one variant share batches. Outputs:

* ``grid.png``: rows = prompt/seed, columns = variant (x guidance scale).
* manifest: the image records (with ``guidance_variant``, ``guidance_schedule``, ``guidance_rule``) and one
  ``compute`` record per variant: UNet rows evaluated, what full CFG would have evaluated, the saving.
* ``guidance_grid.json`` + W&B tables ``samples`` (per image, with metrics) and ``guidance_variants``
  (per variant: compute, ``nfe_per_image`` = network rows per image over the whole run, ``seconds``, mean
  metrics) + ``metrics_by_variant.png`` and ``zoo_pareto.png`` (each metric's mean against NFE per image,
  a point per variant) when metrics are configured.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from omegaconf import ListConfig, OmegaConf
from PIL import Image

from stablefused import registry
from stablefused.errors import ConfigError
from stablefused.guidance import Guidance, guider_problems
from stablefused.outputs import strict_json
from stablefused.plots import metric_bars, metric_vs
from stablefused.runs import Run, log_samples_table, means, prompt_seed_rows, row_label, wrap
from stablefused.tasks import Task, register_task
from stablefused.tasks.txt2img import grid_image_count, guidance_cells, txt2img_batch

log = logging.getLogger(__name__)
VARIANT_KEYS = ("label", "schedule", "params", "rule", "rule_params")


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def variants(guidance_cfg: Any) -> list[dict]:
    """The variants of a guidance config, each ``{label, schedule, params, rule, rule_params}``, checked
    against the registry (``ConfigError`` names the bad variant)."""
    g = _plain(guidance_cfg)
    top = {"schedule": g.get("schedule", "constant"), "params": dict(g.get("params") or {}),
           "rule": g.get("rule", "cfg"), "rule_params": dict(g.get("rule_params") or {})}
    items = g.get("grid") or [{}]
    if not isinstance(items, list):
        raise ConfigError("guidance.grid: must be a list of variants ({schedule: ..., rule: ...})")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"guidance.grid[{i}]={item!r}: must be a mapping with keys {', '.join(VARIANT_KEYS)}")
        bad = [k for k in item if k not in VARIANT_KEYS]
        if bad:
            raise ConfigError(f"guidance.grid[{i}].{bad[0]}: unknown key; allowed: {', '.join(VARIANT_KEYS)}")
        v = {"schedule": item.get("schedule", top["schedule"]), "rule": item.get("rule", top["rule"])}
        v["params"] = dict(item.get("params") or (top["params"] if v["schedule"] == top["schedule"] else {}))
        v["rule_params"] = dict(item.get("rule_params") or (top["rule_params"] if v["rule"] == top["rule"] else {}))
        for name_key, kind, params_key in (("schedule", "guidance_schedule", "params"),
                                           ("rule", "guidance_rule", "rule_params")):
            try:
                registry.check_params(kind, v[name_key], v[params_key])
            except registry.ParamError as e:
                raise ConfigError("\n".join(f"guidance.grid[{i}].{params_key}.{p}" for p in e.problems)) from None
            except registry.PluginError as e:
                raise ConfigError(f"guidance.grid[{i}]: {e}") from None
        v["label"] = item.get("label")
        out.append(v)
    _labels(out)
    for v in out:  # record the parameters in effect, defaults included
        v["params"] = {**_defaults("guidance_schedule", v["schedule"]), **v["params"]}
        v["rule_params"] = {**_defaults("guidance_rule", v["rule"]), **v["rule_params"]}
    return out


def _defaults(kind: str, name: str) -> dict:
    return next(p.params for p in registry.list_plugins(kind) if p.name == name)


def _fmt(params: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _labels(vs: list[dict]) -> None:
    """Default labels name what varies across the variants: the schedule and/or the rule, with their
    parameters where two variants share a plugin but not its parameters."""

    def varies(name_key: str, params_key: str) -> bool:
        return len({(v[name_key], json.dumps(v[params_key], sort_keys=True)) for v in vs}) > 1

    def part(v: dict, name_key: str, params_key: str) -> str:
        same = {json.dumps(o[params_key], sort_keys=True) for o in vs if o[name_key] == v[name_key]}
        return v[name_key] + (f"({_fmt(v[params_key])})" if len(same) > 1 and v[params_key] else "")

    show_s, show_r = varies("schedule", "params"), varies("rule", "rule_params")
    if not (show_s or show_r):
        show_s = show_r = True
    for v in vs:
        if not v["label"]:
            parts = [part(v, "schedule", "params")] if show_s else []
            parts += [part(v, "rule", "rule_params")] if show_r else []
            v["label"] = " / ".join(parts)


@register_task("guidance_grid")
class GuidanceGrid(Task):
    """The same prompts and seeds under several guidance variants (schedule + rule), side by side."""

    refiner = True  # its batches are txt2img's

    def image_count(self, cfg: Any) -> int | None:
        n, grid = grid_image_count(cfg), cfg.guidance.get("grid")
        return n and n * (len(grid) if isinstance(grid, (list, ListConfig)) and grid else 1)

    def validate(self, cfg: Any, problems: list[str]) -> None:
        try:
            vs = variants(cfg.guidance)
        except ConfigError as e:
            problems.append(str(e))
            return
        if cfg.guidance.get("grid") and not cfg.guidance.get("skip_unsupported"):
            # each variant's guider against the model and scheduler (e.g. SAG on SD3)
            problems += [f"guidance.grid[{i}]: {p}" for i, v in enumerate(vs)
                         for p in guider_problems(cfg, v["rule"], v["rule_params"])]

    def run(self, run: Run) -> None:
        cfg = run.cfg
        vs = variants(cfg.guidance)
        if cfg.guidance.get("skip_unsupported"):  # the zoo: guiders not defined for this model/scheduler sit out
            for v in vs:
                for p in guider_problems(cfg, v["rule"], v["rule_params"]):
                    log.warning("guidance variant %s skipped: %s", v["label"], p)
            vs = [v for v in vs if not guider_problems(cfg, v["rule"], v["rule_params"])]
        rows, scales = prompt_seed_rows(cfg), [float(g) for g in cfg.guidance_scales]
        ncols = len(vs) * len(scales)
        run.total = len(rows) * ncols
        summary = []
        for vi, v in enumerate(vs):
            extra = dict(guidance_variant=v["label"], guidance_schedule=v["schedule"], guidance_rule=v["rule"],
                         guidance_params=v["params"], guidance_rule_params=v["rule_params"])
            cells = guidance_cells(run, first_index=vi * len(rows) * len(scales), col_offset=vi * len(scales), **extra)
            guidance = Guidance.from_config(v)  # fresh state per variant
            start = time.perf_counter()
            compute = run.generate(cells, txt2img_batch(run, guidance))
            full, made = compute["full_cfg_rows"], compute["images"]
            compute["saving"] = 1 - compute["unet_rows"] / full if full else None  # None: resumed from disk
            compute["nfe_per_image"] = compute["unet_rows"] / made if made else None
            compute["seconds"] = time.perf_counter() - start if made else None
            run.manifest.append({"type": "compute", "variant": v["label"], "schedule": v["schedule"],
                                 "params": v["params"], "rule": v["rule"], "rule_params": v["rule_params"], **compute})
            m = means([r for r in run.records if r.get("guidance_variant") == v["label"]])
            summary.append({"variant": v["label"], **compute, **m})
            log.info("%s: %d UNet rows (%s fewer than full CFG)%s", v["label"], compute["unet_rows"],
                     "?" if full == 0 else f"{100 * compute['saving']:.0f}%", "".join(f", {k}={x:.3f}" for k, x in m.items()))

        cells_img: list[Image.Image | None] = [None] * (len(rows) * ncols)
        for img, rec in zip(run.images, run.records):
            cells_img[rec["row"] * ncols + rec["col"]] = img
        col_labels = [wrap(v["label"]) if len(scales) == 1 else wrap(f"{v['label']}\nw={g:g}")
                      for v in vs for g in scales]
        run.save_grid(cells_img, len(rows), ncols, [row_label(p, s) for p, s in rows], col_labels,
                      caption=f"{cfg.name}: rows prompt/seed, columns guidance variant")
        _report(run, summary)


def table_markdown(summary: list[dict]) -> str:
    """The per-variant table (compute and mean metrics) as Markdown."""
    keys = [k for k in summary[0] if k not in ("variant", "model_calls", "full_cfg_rows")]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s in summary:
        cells = [("-" if s[k] is None else f"{100 * s[k]:.0f}%") if k == "saving" else (f"{s[k]:.3f}" if isinstance(s[k], float) else str(s[k]))
                 for k in keys]
        lines.append(f"| {s['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(run: Run, summary: list[dict]) -> None:
    path = run.path("guidance_grid.json")
    path.write_text(strict_json(summary))
    run.add_artifact(path, "file", caption="per guidance variant: UNet rows and mean metrics")
    md = run.path("guidance_grid.md")
    md.write_text(table_markdown(summary) + "\n")
    run.add_artifact(md, "file", caption="per guidance variant, as a Markdown table")
    log.info("guidance variants:\n%s", table_markdown(summary))
    columns = list(summary[0])
    run.logger.table("guidance_variants", columns, [[s.get(c) for c in columns] for s in summary])
    run.logger.summary({f"{k}@{s['variant']}": s[k] for s in summary for k in columns
                        if k != "variant" and isinstance(s[k], (int, float))})
    log_samples_table(run, ("guidance_variant", "guidance_schedule", "guidance_rule", "prompt", "seed", "guidance_scale"))
    mkeys = [k for k in summary[0] if k not in ("variant", "unet_rows", "model_calls", "full_cfg_rows", "images",
                                                "saving")]
    mkeys = [k for k in mkeys if k not in ("nfe_per_image", "seconds")]
    if mkeys:
        plot = metric_bars(summary, mkeys, run.path("metrics_by_variant.png"), f"{run.cfg.model.name}: metrics per variant")
        run.add_artifact(plot, "plot", caption="mean metric per guidance variant", log_key="metrics_by_variant")
        if all(s.get("nfe_per_image") is not None for s in summary):
            plot = metric_vs(summary, mkeys, "nfe_per_image", "network rows (NFE) per image", run.path("zoo_pareto.png"), f"{run.cfg.model.name}: quality against cost")
            run.add_artifact(plot, "plot", caption="mean metric against network rows per image, a point per variant",
                             log_key="zoo_pareto")
