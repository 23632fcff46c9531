"""``task=txt2img``: every (prompt, seed) row under every guidance scale, in shared batches.

Grid rows = prompt/seed, columns = guidance scale. With metrics, their mean per guidance scale is written
(``metrics_by_guidance.json``) and plotted (``adherence.png``).
"""

from __future__ import annotations

from stablefused.runs import (
    Run, image_size, log_samples_table, prompt_seed_rows, row_label, summarise_metrics,
)
from stablefused.tasks import Task, register_task


def guidance_cells(run: Run, first_index: int = 0, col_offset: int = 0, **extra) -> list[dict]:
    """One cell per (prompt/seed row, guidance scale), numbered from ``first_index``."""
    rows, scales = prompt_seed_rows(run.cfg), [float(g) for g in run.cfg.guidance_scales]
    cells = [dict(row=r, col=col_offset + c, prompt=p, seed=s, guidance_scale=g, **extra)
             for r, (p, s) in enumerate(rows) for c, g in enumerate(scales)]
    for k, cell in enumerate(cells):
        cell["index"] = first_index + k
    return cells


def txt2img_batch(run: Run, guidance=None):
    """``make`` for :meth:`Run.generate`: a batch of cells through the sampler's text-to-image."""
    cfg = run.cfg
    height, width = image_size(cfg)

    def make(chunk: list[dict]):
        if run.refiner is not None:  # SDXL base, then the refiner from model.refiner_handover of the schedule
            from stablefused.families.sdxl import txt2img_refined

            return txt2img_refined(
                run.sampler, run.refiner.sampler, [x["prompt"] for x in chunk], [x["seed"] for x in chunk],
                [x["guidance_scale"] for x in chunk], cfg.negative_prompt, steps=cfg.steps,
                handover=run.refiner.handover, height=height, width=width, guidance=guidance or run.guidance,
                samples=chunk, eta=cfg.eta, progress=cfg.progress)
        return run.sampler.txt2img(
            [x["prompt"] for x in chunk], [x["seed"] for x in chunk], [x["guidance_scale"] for x in chunk],
            cfg.negative_prompt, steps=cfg.steps, height=height, width=width, guidance=guidance or run.guidance,
            hooks=list(run.recorders.values()), samples=chunk, eta=cfg.eta, progress=cfg.progress,
        )

    return make


def grid_image_count(cfg) -> int | None:
    """prompt/seed rows x guidance scales, None when those lists are bad (validation says why)."""
    try:
        prompts, seeds, scales = list(cfg.prompts or cfg.model.get("example_prompts") or []), list(cfg.seeds), \
            list(cfg.guidance_scales)
    except Exception:
        return None
    rows = min(len(prompts), len(seeds)) if cfg.combine == "zip" else len(prompts) * len(seeds)
    return rows * len(scales) or None


@register_task("txt2img")
class Txt2Img(Task):
    """Text to image: rows = prompt/seed, columns = guidance scale."""

    refiner = True

    def image_count(self, cfg) -> int | None:
        return grid_image_count(cfg)

    def run(self, run: Run) -> None:
        cfg = run.cfg
        rows, scales = prompt_seed_rows(cfg), [float(g) for g in cfg.guidance_scales]
        run.generate(guidance_cells(run), txt2img_batch(run))
        run.save_grid(run.images, len(rows), len(scales), [row_label(p, s) for p, s in rows],
                      [f"guidance {g:g}" for g in scales], caption=f"{cfg.name}: rows prompt/seed, columns guidance")
        log_samples_table(run)
        summarise_metrics(run)
