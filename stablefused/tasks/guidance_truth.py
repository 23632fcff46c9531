"""``task=guidance_truth`` (on ``model=gmm``): does a guided sampler sample what it claims?

For every guidance variant (``guidance.grid``, as in ``task=guidance_grid``), prompt (a label of the
mixture) and guidance scale w, ``points`` samples go through the one loop, and are compared with exact
samples (:mod:`stablefused.truth`) of

* the conditional p(x | c) — what the model is trained to sample at w = 1, and
* the tilted target p(x | c)^w · p(x)^(1−w) — the distribution whose score is CFG's combined score.

Per cell (a ``truth`` record in the manifest, written as each cell finishes, with its points in
``points/<index>.npy``; a rerun keeps the finished cells):
sliced W2 to each target, the same distance between two independent exact sample sets (the noise floor), the
total-variation distance between the cell's and the target's mass per mixture component (mode coverage), and
network rows per point. ``truth.png``: scatter plots, rows = variant, columns = w, a colour per prompt over
the tilted target's samples in grey; ``truth_w2.png``: W2 to the tilted target against w, a line per variant;
W&B gets the table.
"""

from __future__ import annotations

import json
import logging
from numbers import Integral
from typing import Any

import numpy as np

from stablefused.errors import ConfigError
from stablefused.guidance import Guidance
from stablefused.runs import Run
from stablefused.tasks import Task, register_task
from stablefused.tasks.guidance_grid import variants
from stablefused.truth import exact_samples, mode_masses, sliced_w2, tilted_samples

log = logging.getLogger(__name__)
COLOURS = {"red": "tab:red", "green": "tab:green", "blue": "tab:blue"}


@register_task("guidance_truth")
class GuidanceTruth(Task):
    """model=gmm: guided samples against the exact conditional and the tilted target."""

    output_type = "truth"

    def validate(self, cfg: Any, problems: list[str]) -> None:
        n = cfg.get("points")
        if isinstance(n, bool) or not isinstance(n, Integral) or not 50 <= n <= 200_000:
            problems.append(f"points={n!r}: must be an integer in [50, 200000] (samples per prompt, variant and scale)")
        from stablefused.families import family_of_model_cfg

        family = family_of_model_cfg(cfg.model)
        if family not in (None, "gmm"):
            problems.append(f"task=guidance_truth: needs model=gmm (a model whose true distribution is known), not "
                            f"model={cfg.model.get('name')} (a {family} model)")
        try:
            variants(cfg.guidance)
        except ConfigError as e:
            problems.append(str(e))

    def run(self, run: Run) -> None:
        cfg, family = run.cfg, run.components.family
        if family.name != "gmm":
            raise ConfigError(f"task=guidance_truth: needs model=gmm, model={cfg.model.name} is a {family.name} model")
        components = family.network.config.components
        labels = list(cfg.prompts or cfg.model.get("example_prompts") or family.network.labels)
        scales, n = [float(w) for w in cfg.guidance_scales], int(cfg.points)
        first_seed = int(list(cfg.seeds)[0]) * n
        results, points, index = [], {}, 0
        for v in variants(cfg.guidance):
            guidance = Guidance.from_config(v)
            label = v["label"]
            for prompt in labels:
                exact = exact_samples(components, [prompt], n, np.random.default_rng(1))
                floor = sliced_w2(exact, exact_samples(components, [prompt], n, np.random.default_rng(2)))
                for w in scales:
                    tilted = tilted_samples(components, prompt, w, n, np.random.default_rng(3))
                    rec = run.done.get(index)
                    if rec is not None:  # a resumed run: this cell's points are on disk
                        x = np.load(run.run_dir / rec["path"])
                    else:
                        gen = run.sampler.txt2img([prompt] * n, list(range(first_seed, first_seed + n)), w,
                                                  cfg.negative_prompt, steps=int(cfg.steps), guidance=guidance,
                                                  eta=float(cfg.eta), progress=False)
                        for k in run.stats:
                            run.stats[k] += gen.context.stats[k]
                        x = gen.latents.reshape(n, -1).double().cpu().numpy()
                        path = run.path("points", f"{index:04d}.npy")
                        np.save(path, x)
                        rec = {"type": "truth", "index": index, "path": str(path.relative_to(run.run_dir)),
                               "variant": label, "prompt": prompt, "guidance_scale": w, "points": n,
                               "w2_conditional": sliced_w2(x, exact), "w2_tilted": sliced_w2(x, tilted),
                               "w2_floor": floor,
                               "modes_tv_tilted": 0.5 * float(np.abs(mode_masses(components, x)
                                                                     - mode_masses(components, tilted)).sum()),
                               "rows_per_point": gen.context.stats["unet_rows"] / n}
                        run.manifest.append(rec)  # written as each cell finishes: an interrupt keeps it
                        log.info("%s %s w=%g: W2 to tilted %.3f, to p(x|c) %.3f (floor %.3f)", label, prompt, w,
                                 rec["w2_tilted"], rec["w2_conditional"], floor)
                    results.append(rec)
                    points[(label, prompt, w)] = (x, tilted)
                    index += 1
        run.path("truth.json").write_text(json.dumps(results, indent=1))
        self._plots(run, results, points, labels, scales)
        if run.logger.run is not None:
            cols = list(results[0])
            run.logger.table("guidance_truth", cols, [[r[c] for c in cols] for r in results])

    @staticmethod
    def _plots(run: Run, results: list[dict], points: dict, labels: list[str], scales: list[float]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(dict.fromkeys(r["variant"] for r in results))
        fig, axes = plt.subplots(len(names), len(scales), figsize=(2.6 * len(scales), 2.6 * len(names)),
                                 squeeze=False, dpi=100)
        for i, name in enumerate(names):
            for j, w in enumerate(scales):
                ax = axes[i][j]
                for prompt in labels:
                    x, tilted = points[(name, prompt, w)]
                    ax.scatter(tilted[:400, 0], tilted[:400, 1], s=2, c="0.75")
                    ax.scatter(x[:400, 0], x[:400, 1], s=2, c=COLOURS.get(prompt, None), label=prompt)
                ax.set_xlim(-5, 5), ax.set_ylim(-5, 5), ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"w = {w:g}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(name, fontsize=9)
        fig.suptitle("samples (colour) over the tilted target p(x|c)^w p(x)^(1-w) (grey)", fontsize=9)
        fig.tight_layout()
        path = run.path("truth.png")
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        run.add_artifact(path, "plot", caption="guided samples vs the tilted target", log_key="truth")

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for name in names:
            for prompt in labels:
                rs = [r for r in results if r["variant"] == name and r["prompt"] == prompt]
                ax.plot([r["guidance_scale"] for r in rs], [r["w2_tilted"] for r in rs], marker="o",
                        label=f"{name} / {prompt}")
        floor = max(r["w2_floor"] for r in results)
        ax.axhline(floor, color="0.5", ls="--", lw=1, label="noise floor")
        ax.set_xlabel("guidance scale w"), ax.set_ylabel("sliced W2 to the tilted target"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = run.path("truth_w2.png")
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        run.add_artifact(path, "plot", caption="distance to the tilted target per guidance scale", log_key="truth_w2")
