"""Which object does a two-object prompt lose? For "a circle and a square"-style prompts: how often the first- or
the second-named shape is missing, and how often the second is missing because it was drawn as the first shape
(the first shape twice, as in "a circle and a square" giving two circles) — the neglect and attribute leakage
that Attend-and-Excite (Chefer et al. 2023) describes in real text-to-image models.

    OMP_NUM_THREADS=1 python benchmarks/object_neglect.py scenes scenes_flow [--scales 3 7.5]

The prompts are the quality table's two-object prompts (:func:`stablefused.scenes.evaluate.category_prompts`: 40
of the 240), seeds 0..39, 20 steps of the model's scheduler.
"""

from __future__ import annotations

import argparse

import torch

from stablefused.scenes import evaluate
from stablefused.scenes.judge import detect, judge, parse_prompt


def neglect(images, prompts) -> dict[str, float]:
    counts = dict.fromkeys(("pass", "first missing", "second missing", "second drawn as first"), 0)
    for image, prompt in zip(images, prompts):
        (_, _, first), (_, _, second) = parse_prompt(prompt)["wants"]
        shapes = [o.shape for o in detect(image)[1]]
        counts["pass"] += judge(image, prompt)["correct"]
        counts["first missing"] += first not in shapes
        counts["second missing"] += second not in shapes
        counts["second drawn as first"] += second not in shapes and shapes.count(first) >= 2
    return {k: v / len(prompts) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="scenes, scenes_flow or folders")
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from stablefused.pipeline import Sampler

    prompts = evaluate.category_prompts("two")
    print(f"| model | guidance | pass rate | first-named shape missing | second missing | second drawn as the first |"
          f"  ({len(prompts)} prompts)")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        sampler = Sampler(evaluate.load(name))
        for g in a.scales:
            r = neglect(evaluate.sample(sampler, prompts, g), prompts)
            print(f"| {name} | {g:g} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
