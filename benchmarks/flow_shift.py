"""Does a flow model's sampling shift change its scene scores? The judge's pass rates of a flow-matching scene model
under several ``shift`` values of its ``FlowMatchEulerDiscreteScheduler`` (SD3 ships 3.0; a larger shift spends
more of the steps at high noise, where the layout is set), on held-out prompts.

    OMP_NUM_THREADS=1 python benchmarks/flow_shift.py scenes_flow --shifts 1 2 3

The prompts are :func:`stablefused.scenes.evaluate.eval_prompts` from seed 8,000,000 (not the README quality
table's 7,000,000+, so a shift chosen here is not chosen on the table's prompts), image seeds 50,000+, 20 steps.
Only the scheduler's config changes; the weights are the folder's.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from stablefused.scenes import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="scenes_flow", help="a bundled flow model's name or a folder")
    p.add_argument("--shifts", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--prompts", type=int, default=240)
    p.add_argument("--scales", type=float, nargs="+", default=[7.5, 3.0])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    prompts = evaluate.eval_prompts(a.prompts, first_seed=8_000_000)
    comps = evaluate.load(a.model)
    print("| shift | guidance | single | two | counting | colors | position | color_attr | overall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shift in a.shifts:
        shifted = dataclasses.replace(comps, scheduler_config={**comps.scheduler_config, "shift": shift})
        rows = evaluate.table(shifted, scales=a.scales, steps=20, seed=50_000, prompts=prompts)
        for g in a.scales:
            r = rows[f"guidance {g:g}"]
            print(f"| {shift:g} | {g:g} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
