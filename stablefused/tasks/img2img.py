"""``task=img2img``: SDEdit. Each source image is encoded, noised to a strength, and denoised towards the
prompt through the one loop, as ``StableDiffusionImg2ImgPipeline.__call__`` does it step for step:

1. ``get_timesteps(steps, strength)``: ``t_start = steps - int(strength * steps)``; :meth:`Sampler.prepare`
   sets the timesteps and the begin index ``t_start * scheduler.order`` (``set_begin_index``);
2. per image, from its own generator: the VAE latent sample, then the noise; ``add_noise`` at the first
   timestep that runs;
3. :meth:`Sampler.sample` with ``start_step=t_start``: only the last ``int(strength * steps)`` steps run.

Grid rows = source image x prompt/seed; column 0 shows the source (after the ``resize`` policy), then one
column per strength x guidance scale. Records carry ``init_image``, ``source`` (its description, when
known: ``shapes:`` sources), ``strength`` and ``resize``. With metrics, their mean per strength is
written (``metrics_by_strength.json``, plot).
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from stablefused import images as im
from stablefused.errors import ConfigError
from stablefused.pipeline import Generation, Sampler
from stablefused.sampling import Request
from stablefused.runs import Run, image_record, log_samples_table, prompt_seed_rows, row_label, summarise_metrics, wrap
from stablefused.tasks import Task, register_task

log = logging.getLogger(__name__)


def first_step(steps: int, strength: float) -> int:
    """``StableDiffusionImg2ImgPipeline.get_timesteps``: the first of ``steps`` steps that runs at ``strength``."""
    return max(steps - min(int(steps * strength), steps), 0)


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
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} x steps {steps} runs no step")
    if encoded is None:
        encoded = im.encode(c.vae, im.to_pixels(sources, c.vae_scale_factor))
    cond, uncond, negative = sampler.conditions(prompts, negative_prompts, guidance)
    t_start = first_step(steps, strength)
    generators = sampler.prepare(steps, seeds, start_step=t_start, height=sources[0].height, width=sources[0].width)
    init = sampler.family.image_latents(encoded, generators)
    latents, _ = im.noised_latents(scheduler, init, generators, scheduler.timesteps[t_start * scheduler.order:][:1])
    latents = sampler.family.from_spatial(latents)  # Flux packs after noising, as its pipeline does
    request = Request(latents, cond, uncond, list(guidance_scales), steps, start_step=t_start,
                      generators=generators, samples=samples, eta=eta, negative=negative)
    return sampler.sample(request, guidance=guidance, hooks=hooks, progress=progress)


def _strength_problems(cfg: Any) -> list[str]:
    v = cfg.get("strengths")
    if isinstance(v, Real) and not isinstance(v, bool):
        return [f"strengths={v}: must be a list, e.g. strengths=[{v}]"]
    try:
        items = list(v)
    except TypeError:
        return [f"strengths={v!r}: must be a list of numbers in (0, 1], e.g. strengths=[0.3,0.6,0.9]"]
    if not items:
        return ["strengths=[]: give at least one strength in (0, 1], e.g. strengths=[0.6]"]
    out = []
    steps = cfg.get("steps")
    for s in items:
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or not 0 < s <= 1:
            out.append(f"strengths: {s!r} is not in (0, 1]; 0 would return the source unchanged, 1 noises it fully "
                       "(use e.g. strengths=[0.3,0.6,0.9])")
        elif isinstance(steps, int) and int(s * steps) < 1:
            out.append(f"strengths: {s:g} x steps={steps} runs no denoising step (int(strength*steps) = 0); "
                       f"use strength >= {1 / steps:g} or more steps")
    return out


@register_task("img2img")
class Img2Img(Task):
    """Image to image (SDEdit): rows = source image x prompt/seed, columns = source | strength x guidance."""

    def validate(self, cfg: Any, problems: list[str]) -> None:
        problems += _strength_problems(cfg)
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
                self.output_size(cfg, found[0][0], found[0][1], max_size)
            except ConfigError as e:
                problems.append(str(e))
        strengths = cfg.get("strengths")
        if cfg.get("recorders") and _selected_recorders(cfg) and len(list(strengths or [])) > 1:
            problems.append(f"strengths={list(strengths)}: recorders keep one step axis per run, and each strength "
                            "runs a different number of steps; record one strength at a time (e.g. "
                            f"strengths=[{list(strengths)[-1]}]) or drop the recorders")

    @staticmethod
    def output_size(cfg: Any, name: str, size: tuple[int, int], max_size: float) -> tuple[int, int]:
        """(height, width) of every output: ``height``/``width`` where given, else the first image's size after
        the resize policy (as diffusers sizes a list of images by its first)."""
        mult = int(cfg.model.get("size_multiple") or 8)
        out = im.target_size(size, cfg.resize, mult, cfg.get("height"), cfg.get("width"))
        im.check_size(name, size, out, cfg.model, float(max_size))
        return out

    # ---- shared with task=inpaint (a subclass): inputs, cells and the grid of a source-image task
    @staticmethod
    def save_input(run: Run, i: int, source: Any, image: Image.Image, height: int, width: int) -> None:
        """Source ``i`` as the model sees it (fitted), listed in the manifest before any output."""
        path = run.path("inputs", f"source_{i:02d}.png")
        image.save(path)
        run.add_artifact(path, "input", caption=source.description or source.spec, log_key=f"source_{i:02d}",
                         init_image=source.spec, source=source.description, original_size=list(source.image.size),
                         converted=source.converted, resize=run.cfg.resize, height=height, width=width)

    @staticmethod
    def rows(run: Run, sources: list) -> list[tuple[int, str, int]]:
        """Grid rows: (source index, prompt, seed) for every source x prompt/seed row."""
        return [(i, p, s) for i in range(len(sources)) for p, s in prompt_seed_rows(run.cfg)]

    @staticmethod
    def strength_cells(run: Run, rows: list, sources: list, height: int, width: int,
                       **extra: Callable[[int], Any]) -> list[tuple[float, list[dict]]]:
        """The cells of each strength (one strength per batch: it sets where the loop starts). Column 0 is the
        source; ``extra``: record keys computed from the source index."""
        cfg = run.cfg
        strengths, scales = [float(s) for s in cfg.strengths], [float(g) for g in cfg.guidance_scales]
        per_row = len(strengths) * len(scales)
        run.total = len(rows) * per_row
        out = []
        for si, strength in enumerate(strengths):
            cells = []
            for r, (i, p, seed) in enumerate(rows):
                for gi, g in enumerate(scales):
                    col = si * len(scales) + gi
                    cells.append(dict(index=r * per_row + col, row=r, col=1 + col, prompt=p, seed=seed,
                                      guidance_scale=g, strength=strength, init_image=sources[i].spec,
                                      source=sources[i].description, resize=cfg.resize, height=height,
                                      width=width, **{k: f(i) for k, f in extra.items()}, source_index=i))
            out.append((strength, cells))
        return out

    @staticmethod
    def record(run: Run, cell: dict) -> dict:
        return image_record(run, {k: v for k, v in cell.items() if k != "source_index"})

    @staticmethod
    def save_grid(run: Run, rows: list, sources: list, first: list[Image.Image], first_label: str,
                  caption: str) -> None:
        """Rows = source x prompt/seed; column 0 = ``first[source]``, then strength x guidance."""
        cfg = run.cfg
        strengths, scales = [float(s) for s in cfg.strengths], [float(g) for g in cfg.guidance_scales]
        ncols = 1 + len(strengths) * len(scales)
        cells: list[Image.Image | None] = [None] * (len(rows) * ncols)
        for r, (i, _, _) in enumerate(rows):
            cells[r * ncols] = first[i]
        for img, rec in zip(run.images, run.records):
            cells[rec["row"] * ncols + rec["col"]] = img
        col_labels = [first_label] + [f"strength {s:g}" + (f"\nw={g:g}" if len(scales) > 1 else "")
                                      for s in strengths for g in scales]
        row_labels = [wrap(f"{sources[i].description or sources[i].spec.split('/')[-1]}\n-> {p}\nseed {s}")
                      if len(sources) > 1 or sources[i].description else row_label(p, s) for i, p, s in rows]
        run.save_grid(cells, len(rows), ncols, row_labels, col_labels, caption=caption)

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
    """Mean of each metric's ``/mean`` (e.g. edit = ``shapes_adherence/mean`` against the prompt, faithfulness
    = ``shapes_adherence_source/mean`` against the source) per strength and guidance scale: ``tradeoff.json``,
    ``tradeoff.md`` (a table) and ``tradeoff.png`` (one panel per metric, one line per guidance scale)."""
    from stablefused.runs import metric_keys

    keys = [k for k in metric_keys(run.records) if k.endswith("/mean")] or metric_keys(run.records)
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
    edit, faith = "shapes_adherence/mean", "shapes_adherence_source/mean"
    if edit in keys and faith in keys:  # the first strength at which the target wins over the source
        out["crossover"] = {f"{g:g}": next((s for s in strengths if table[(edit, g, s)] > table[(faith, g, s)]), None)
                            for g in scales}
    head = "| strength | " + " | ".join(f"{_short(k)} w={g:g}" for k in keys for g in scales) + " |"
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
    _plot_tradeoff(out, run.path("tradeoff.png"), f"{run.cfg.model.name}: image-to-image, {run.cfg.steps} steps")
    run.add_artifact(run.path("tradeoff.png"), "plot", caption="metrics vs strength, one line per guidance scale",
                     log_key="tradeoff")
    return out


def _short(key: str) -> str:
    return {"shapes_adherence/mean": "edit", "shapes_adherence_source/mean": "faithful"}.get(key, key)


def _plot_tradeoff(out: dict, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(out["means"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), dpi=100, sharey=True, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for g, ys in out["means"][k].items():
            ax.plot(out["strengths"], ys, marker="o", label=f"guidance {g}")
        name = {"shapes_adherence/mean": "edit: adherence to the target prompt",
                "shapes_adherence_source/mean": "faithfulness: adherence to the source"}.get(k, k)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean (0-1)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _selected_recorders(cfg: Any) -> list[str]:
    from stablefused import registry

    return list(registry.selected(cfg, "recorders"))
