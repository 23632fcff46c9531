"""Measure a scene model with the exact judge: VAE round trips, and pass rates per GenEval-style category and
guidance scale on fresh prompts (balanced over the categories).

    python -m stablefused.scenes.evaluate [folder|scenes|scenes_flow] [--prompts 240] [--scales 7.5 3 0 -5]

Used by the training script's final report and by the README's quality tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stablefused.scenes import data
from stablefused.scenes.judge import judge

EVAL_FIRST_SEED = 7_000_000  # scenes never used in training (items 0..dataset_size-1)
SCALES = (7.5, 3.0, 0.0, -5.0)


def load(model: str | None = None):
    """A scene model by bundled name (``scenes``, ``scenes_flow``) or folder; a folder's training args give the
    (zero) T5 length a flow model was trained with."""
    from stablefused.models import load_components

    model = model or "scenes"
    if not Path(model).exists():
        cfg = {"name": model, "bundled": model}
        folder = Path(__file__).resolve().parent.parent / "models" / model
    else:
        cfg, folder = {"name": Path(model).name, "path": str(model)}, Path(model)
    args = folder / "training_args.json"
    if args.exists() and (folder / "transformer").exists():
        cfg["max_sequence_length"] = json.loads(args.read_text())["max_sequence_length"]
    return load_components(cfg, "cpu", "float32")


def eval_prompts(n: int, first_seed: int = EVAL_FIRST_SEED) -> list[str]:
    """``n`` fresh prompts, the categories in turn."""
    return [data.make_scene(first_seed + i, category=data.CATEGORIES[i % len(data.CATEGORIES)]).prompt
            for i in range(n)]


def category_prompts(category: str, n: int = 240, first_seed: int = EVAL_FIRST_SEED) -> list[str]:
    """The prompts of one category among :func:`eval_prompts` (n), in order."""
    return eval_prompts(n, first_seed)[data.CATEGORIES.index(category)::len(data.CATEGORIES)]


def sample(sampler, prompts: Sequence[str], scale: float, steps: int = 20, seed: int = 0, chunk: int = 120) -> list:
    """One image per prompt at guidance ``scale``, seeds seed, seed+1, ..., in batches of ``chunk``."""
    images = []
    for i in range(0, len(prompts), chunk):
        ps = list(prompts[i:i + chunk])
        images.extend(sampler.txt2img(ps, list(range(seed + i, seed + i + len(ps))), [float(scale)] * len(ps),
                                      steps=steps, progress=False).images)
    return images


@torch.no_grad()
def vae_accuracy(comps, n: int = 300, first_seed: int = 5_000_000) -> dict[str, float]:
    """Judge pass rate of VAE reconstructions of fresh scenes, against their own prompts."""
    imgs, prompts, _ = data.items(range(first_seed, first_seed + n))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1
    rec = torch.cat([(comps.vae.decode(comps.vae.encode(c).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
                     for c in x.split(100)]).permute(0, 2, 3, 1).numpy()
    return pass_rates([judge(r, p) for r, p in zip(rec, prompts)])


def pass_rates(verdicts: Sequence[dict]) -> dict[str, float]:
    """Per category and overall (the mean over categories, as GenEval reports)."""
    per = {c: [v["correct"] for v in verdicts if v["category"] == c] for c in data.CATEGORIES}
    out = {c: float(np.mean(v)) for c, v in per.items() if v}
    out["overall"] = float(np.mean(list(out.values())))
    return out


def chance(prompts: Sequence[str], first_seed: int = 6_000_000) -> dict[str, float]:
    """Pass rates of random dataset scenes (not drawn for the prompt): what an image that ignores the prompt
    scores."""
    imgs, _, _ = data.items(range(first_seed, first_seed + len(prompts)))
    return pass_rates([judge(i, p) for i, p in zip(imgs, prompts)])


def table(comps, n: int = 240, scales: Sequence[float] = SCALES, steps: int = 20, seed: int = 0,
          chunk: int = 120, prompts: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Pass rates per guidance scale (one image per prompt — ``prompts``, else :func:`eval_prompts` (n) —, seeds
    seed..seed+n-1, ``steps`` steps of the model's scheduler through the project's sampler), and the chance row."""
    from stablefused.pipeline import Sampler

    prompts = list(prompts) if prompts is not None else eval_prompts(n)
    sampler = Sampler(comps)
    rows = {}
    for g in scales:
        images = sample(sampler, prompts, g, steps, seed, chunk)
        rows[f"guidance {g:g}"] = pass_rates([judge(im, p) for im, p in zip(images, prompts)])
    rows["chance (random scene)"] = chance(prompts)
    return rows


def markdown(rows: dict[str, dict[str, float]]) -> list[str]:
    cols = [*data.CATEGORIES, "overall"]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for name, r in rows.items()]
    return lines


def quality_report(folder: str | None = None, n: int = 60) -> list[str]:
    comps = load(folder)
    return [f"vae reconstructions pass the judge: {vae_accuracy(comps)}", *markdown(table(comps, n))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="scenes", help="scenes, scenes_flow or a folder")
    p.add_argument("--prompts", type=int, default=240)
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    comps = load(a.model)
    print(f"vae reconstructions pass the judge: {vae_accuracy(comps)}")
    for line in markdown(table(comps, a.prompts, a.scales, a.steps)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
