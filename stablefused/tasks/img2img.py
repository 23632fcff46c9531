"""``task=img2img``: SDEdit. Each source image is encoded, noised to a strength, and denoised towards the
prompt through the one loop, as ``StableDiffusionImg2ImgPipeline.__call__`` does it step for step:

1. ``get_timesteps(steps, strength)`` (:meth:`Family.first_step`): ``t_start = steps - int(strength * steps)``
   (flow-matching families, SD3/Flux: ``int(steps - strength * steps)``); :meth:`Sampler.prepare`
   sets the timesteps and the begin index ``t_start * scheduler.order`` (``set_begin_index``);
2. per image, from its own generator: the VAE latent sample, then the noise; ``add_noise`` at the first
   timestep that runs;
3. :meth:`Sampler.sample` with ``start_step=t_start``: only the last ``steps - t_start`` steps run.

Grid rows = source image x prompt/seed; column 0 shows the source (after the ``resize`` policy), then one
column per strength x guidance scale. Records carry ``init_image``, ``source`` (its description, when
known: ``shapes:`` sources), ``strength`` and ``resize``. With metrics, their mean per strength is
written (``metrics_by_strength.json``, plot).
"""

from __future__ import annotations

import logging
from numbers import Real
from typing import Any, Sequence, Union

import torch
from PIL import Image

from stablefused import images as im
from stablefused.errors import ConfigError
from stablefused.pipeline import Generation, Sampler
from stablefused.sampling import Request
from stablefused.runs import Run, log_samples_table, summarise_metrics
from stablefused.source_images import SourceImageTask, selected_recorders, strength_problems
from stablefused.tasks import register_task

log = logging.getLogger(__name__)


@torch.no_grad()
def img2img(
    sampler: Sampler,
    sources: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scales: Sequence[float],
    strength: float,
    negative_prompts: Sequence[str] | str = "",
    *,
    steps: int = 20,
    encoded: Sequence[Any] | None = None,
    guidance: Any = None,
    hooks: Sequence[Any] = (),
    samples: list[dict] | None = None,
    eta: float = 0.0,
    progress: bool = True,
) -> Generation:
    """One batch of image-to-image at one ``strength``: ``sources`` (RGB PIL images of one size, already
    fitted), one per prompt/seed/scale. ``encoded`` = :func:`stablefused.images.encode` outputs per source
    when the caller keeps them (a source used by many cells is encoded once)."""
    c, scheduler = sampler.c, sampler.scheduler
    n = len(prompts)
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * n
    if steps - sampler.family.first_step(steps, strength) < 1:
        raise ValueError(f"strength {strength} x steps {steps} runs no step")
    if encoded is None:
        encoded = im.encode(c.vae, im.to_pixels(sources, c.vae_scale_factor))
    cond, uncond, negative = sampler.conditions(prompts, negative_prompts, guidance)
    t_start = sampler.family.first_step(steps, strength)
    generators = sampler.prepare(steps, seeds, start_step=t_start, height=sources[0].height, width=sources[0].width)
    init = sampler.family.image_latents(encoded, generators)
    latents, _ = im.noised_latents(scheduler, init, generators, scheduler.timesteps[t_start * scheduler.order:][:1])
    latents = sampler.family.from_spatial(latents)  # Flux packs after noising, as its pipeline does
    request = Request(latents, cond, uncond, list(guidance_scales), steps, start_step=t_start,
                      generators=generators, samples=samples, eta=eta, negative=negative)
    return sampler.sample(request, guidance=guidance, hooks=hooks, progress=progress)


@register_task("img2img")
class Img2Img(SourceImageTask):
    """Image to image (SDEdit): rows = source image x prompt/seed, columns = source | strength x guidance."""

    types = {"init_image": Union[str, list[str], None], "max_size": Real}
    size_from_inputs = True
    input_settings = ("init_image",)

    def validate(self, cfg: Any, problems: list[str]) -> None:
        problems += strength_problems(cfg)
        if cfg.get("resize") not in im.RESIZE_POLICIES:
            problems.append(f"resize={cfg.get('resize')!r}: must be one of {', '.join(im.RESIZE_POLICIES)}")
        max_size = cfg.get("max_size")
        if isinstance(max_size, bool) or not isinstance(max_size, Real) or not max_size > 0:
            problems.append(f"max_size={max_size!r}: must be a number > 0 (largest output side, in multiples of "
                            "the model's native side)")
            max_size = None
        if cfg.get("init_image") in (None, ""):
            problems.append("init_image: not set; give an image, e.g. init_image=path/to/image.png (or a folder, "
                            "or shapes:<description> for the bundled model)")
            return
        try:
            found = im.check(cfg.init_image)
        except ConfigError as e:
            problems.append(str(e))
            return
        if max_size is not None and cfg.get("resize") in im.RESIZE_POLICIES:
            try:
                height, width = self.output_size(cfg, found[0][0], found[0][1], max_size)
                problems += self.max_pixels_problems(cfg, found, height, width)
            except ConfigError as e:
                problems.append(str(e))
        strengths = cfg.get("strengths")
        if cfg.get("recorders") and selected_recorders(cfg) and len(list(strengths or [])) > 1:
            problems.append(f"strengths={list(strengths)}: recorders keep one step axis per run, and each strength "
                            "runs a different number of steps; record one strength at a time (e.g. "
                            f"strengths=[{list(strengths)[-1]}]) or drop the recorders")

    def run(self, run: Run) -> None:
        cfg = run.cfg
        sources = im.load(cfg.init_image)
        height, width = self.output_size(cfg, sources[0].spec, sources[0].image.size, cfg.max_size)
        fitted = [im.fit(s.image, cfg.resize, height, width) for s in sources]
        if len({s.image.size for s in sources}) > 1:
            log.info("init_image: %d images of different sizes, all fitted to %dx%d (resize=%s)", len(sources),
                     width, height, cfg.resize)
        for i, (s, img) in enumerate(zip(sources, fitted)):
            self.save_input(run, i, s, img, height, width)
        encoded = im.encode(run.components.vae, im.to_pixels(fitted, run.components.vae_scale_factor))

        rows = self.rows(run, sources)
        for strength, cells in self.strength_cells(run, rows, sources, height, width):
            def make(chunk: list[dict], strength=strength):
                idx = [x["source_index"] for x in chunk]
                return img2img(run.sampler, [fitted[k] for k in idx], [x["prompt"] for x in chunk],
                               [x["seed"] for x in chunk], [x["guidance_scale"] for x in chunk], strength,
                               cfg.negative_prompt, steps=cfg.steps, encoded=[encoded[k] for k in idx],
                               guidance=run.guidance, hooks=list(run.recorders.values()), samples=chunk,
                               eta=cfg.eta, progress=cfg.progress)

            run.generate(cells, make, record=lambda c: self.record(run, c))

        self.save_grid(run, rows, sources, fitted, "source",
                       f"{cfg.name}: rows source x prompt/seed, columns source | strength x guidance")
        log_samples_table(run, ("init_image", "prompt", "seed", "strength", "guidance_scale"))
        summarise_metrics(run, key="strength", label="strength", filename="metrics_by_strength")
        tradeoff(run)


def tradeoff(run: Run) -> dict | None:
    """Mean of the keys the metrics ask to summarise (``summaries()``, :mod:`stablefused.scores`; e.g.
    ``shapes_adherence``: edit = adherence to the prompt, faithful = to the source), else of every metric key,
    per strength and guidance scale: ``tradeoff.json`` (with the crossover strength when an ``edit`` and a
    ``faithful`` key are there), ``tradeoff.md`` (a table) and ``tradeoff.png`` (a panel per key, a line per
    guidance scale)."""
    from stablefused.scores import declared_summaries, metric_keys

    present, declared = metric_keys(run.records), declared_summaries(run.metrics.values())
    keys = [k for k in declared if k in present] or present
    roles = {declared[k]["role"]: k for k in keys if declared.get(k, {}).get("role")}
    if not keys:
        return None
    strengths = sorted({float(r["strength"]) for r in run.records})
    scales = sorted({float(r["guidance_scale"]) for r in run.records})
    table: dict = {}
    for k in keys:
        for g in scales:
            for s in strengths:
                vals = [r[k] for r in run.records if r["strength"] == s and r["guidance_scale"] == g
                        and r.get(k) is not None]
                table[(k, g, s)] = sum(vals) / len(vals) if vals else float("nan")
    out = {"strengths": strengths, "guidance_scales": scales,
           "means": {k: {f"{g:g}": [table[(k, g, s)] for s in strengths] for g in scales} for k in keys}}
    edit, faith = roles.get("edit"), roles.get("faithful")
    if edit and faith:  # the first strength at which the target wins over the source
        out["crossover"] = {f"{g:g}": next((s for s in strengths if table[(edit, g, s)] > table[(faith, g, s)]), None)
                            for g in scales}
    short = {k: r for r, k in roles.items()}
    head = "| strength | " + " | ".join(f"{short.get(k, k)} w={g:g}" for k in keys for g in scales) + " |"
    lines = [head, "|---" * (1 + len(keys) * len(scales)) + "|"]
    lines += [f"| {s:g} | " + " | ".join(f"{table[(k, g, s)]:.2f}" for k in keys for g in scales) + " |"
              for s in strengths]
    md = "\n".join(lines) + "\n"
    if "crossover" in out:
        md += "\ncrossover (first strength where edit > faithfulness): " + ", ".join(
            f"w={g}: {'none' if s is None else f'{s:g}'}" for g, s in out["crossover"].items()) + "\n"
    from stablefused.outputs import strict_json

    path = run.path("tradeoff.json")
    path.write_text(strict_json(out))
    run.add_artifact(path, "file", caption="mean metrics per strength and guidance scale")
    path = run.path("tradeoff.md")
    path.write_text(md)
    run.add_artifact(path, "file", caption="strength trade-off table (Markdown)")
    log.info("strength trade-off:\n%s", md)
    run.logger.table("tradeoff", ["metric", "guidance_scale", "strength", "value"],
                     [[k, g, s, table[(k, g, s)]] for k in keys for g in scales for s in strengths])
    from stablefused.plots import panels

    panels(out["strengths"], {k: {f"guidance {g}": ys for g, ys in out["means"][k].items()} for k in keys},
           run.path("tradeoff.png"), f"{run.cfg.model.name}: image-to-image, {run.cfg.steps} steps", "strength",
           "mean (0-1)", {k: v["title"] for k, v in declared.items() if "title" in v})
    run.add_artifact(run.path("tradeoff.png"), "plot", caption="metrics vs strength, one line per guidance scale",
                     log_key="tradeoff")
    return out
