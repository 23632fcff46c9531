"""Does guidance erase what a prompt names? Single-object prompts ("a circle", "a triangle on a white background")
sampled at several guidance scales: mean objects the judge finds per image, the fraction of empty canvases, and the
pass rate.

    OMP_NUM_THREADS=1 python benchmarks/guidance_erasure.py scenes scenes_flow [folders ...] [--scales 1 4 7.5]

Guidance extrapolates the conditional prediction away from the unconditional one. If the scenes a prompt
describes hold fewer objects than the data's average (a lone object against one to three), the extrapolation
points towards *fewer objects*, and at high guidance the named object vanishes. The prompts are the quality
table's single-object prompts (:func:`stablefused.scenes.evaluate.category_prompts`: 40 of the 240),
seeds 0..39, 20 steps of the model's scheduler.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stablefused.scenes import evaluate
from stablefused.scenes.judge import detect, judge


def erasure(comps, scales, prompts, steps: int = 20) -> dict[float, dict[str, float]]:
    from stablefused.pipeline import Sampler

    sampler = Sampler(comps)
    out = {}
    for g in scales:
        images = evaluate.sample(sampler, prompts, g, steps)
        counts = [len(detect(im)[1]) for im in images]
        out[float(g)] = {"objects": float(np.mean(counts)), "empty": float(np.mean([c == 0 for c in counts])),
                         "pass": float(np.mean([judge(im, p)["correct"] for im, p in zip(images, prompts)]))}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="scenes, scenes_flow or model folders")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0, 7.5])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    prompts = evaluate.category_prompts("single")
    print(f"| model | guidance | objects / image | empty canvas | single-object pass rate |  ({len(prompts)} prompts)")
    print("|---|---|---|---|---|")
    for m in a.models:
        for g, r in erasure(evaluate.load(m), a.scales, prompts).items():
            print(f"| {m} | {g:g} | {r['objects']:.2f} | {r['empty']:.2f} | {r['pass']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
