"""Measure the shapes model: VAE round-trip accuracy and prompt adherence per guidance scale.

    python -m stablefused.shapes.evaluate [folder]    # default: the bundled model

Used by the training script's final report and by the quality tests (tests/test_shapes_model.py).
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch

from stablefused.shapes import classify, data

# Fixed evaluation set: every colour, shape and background, some sizes, several word orders.
EVAL_PROMPTS = (
    "a red circle on a black background",
    "a green square on a white background",
    "a blue triangle on a black background",
    "a yellow circle on a white background",
    "a purple square on a black background",
    "a small red triangle on a white background",
    "a large green circle on a black background",
    "white background, a blue square",
    "a yellow triangle, large",
    "a purple circle",
)
EVAL_SEEDS = (0, 1, 2)
EVAL_SCALES = (7.5, 0.0, -5.0)
CHANCE = {a: 1.0 / len(data.CHOICES[a]) for a in data.ATTRIBUTES}


def load(folder: str | None = None):
    from stablefused.models import load_components

    cfg = {"name": "shapes", "bundled": "shapes"} if folder is None else {"name": "shapes", "path": folder}
    return load_components(cfg, "cpu", "float32")


@torch.no_grad()
def vae_accuracy(comps, n: int = 500, first_seed: int = 5_000_000) -> dict[str, float]:
    """Fraction of VAE reconstructions of fresh dataset items whose every attribute is classified right."""
    imgs, attrs, _, _ = data.batch(range(first_seed, first_seed + n))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1
    vae = comps.vae
    rec = []
    for chunk in x.split(128):
        rec.append((vae.decode(vae.encode(chunk).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1))
    rec = torch.cat(rec).permute(0, 2, 3, 1).numpy()
    preds = [classify.classify_image(r) for r in rec]
    return {a: float(np.mean([p[a] == t[a] for p, t in zip(preds, attrs)])) for a in data.ATTRIBUTES}


def generate(comps, prompts: Sequence[str], seeds: Sequence[int], scales: Sequence[float], steps: int = 20):
    """Images for every (scale, prompt, seed), through the project's one sampler; with their records."""
    from stablefused.pipeline import Sampler

    records = [{"prompt": p, "seed": s, "guidance_scale": float(g)} for g in scales for p in prompts for s in seeds]
    gen = Sampler(comps).txt2img([r["prompt"] for r in records], [r["seed"] for r in records],
                                 [r["guidance_scale"] for r in records], steps=steps, progress=False)
    return gen.images, records


def adherence(images, records) -> dict[float, dict[str, float]]:
    """Per guidance scale: fraction correct per named attribute (and the mean over attributes)."""
    out: dict[float, dict[str, list]] = {}
    for img, rec in zip(images, records):
        s = classify.score(classify.classify_image(img), rec["prompt"])
        d = out.setdefault(rec["guidance_scale"], {})
        for k, v in s.items():
            if v == v:
                d.setdefault(k, []).append(v)
    return {g: {k: float(np.mean(v)) for k, v in d.items()} for g, d in out.items()}


def quality_report(folder: str | None = None) -> list[str]:
    comps = load(folder)
    lines = [f"vae reconstruction accuracy: {vae_accuracy(comps)}"]
    images, records = generate(comps, EVAL_PROMPTS, EVAL_SEEDS, EVAL_SCALES)
    for g, d in adherence(images, records).items():
        lines.append(f"guidance {g:+.1f}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    lines.append("chance: " + ", ".join(f"{k} {v:.3f}" for k, v in CHANCE.items()))
    return lines


if __name__ == "__main__":
    torch.set_num_threads(1)
    for line in quality_report(sys.argv[1] if len(sys.argv) > 1 else None):
        print(line)
