"""UNet rows and wall time per guidance schedule and rule, through the one loop.

    python benchmarks/bench_guidance.py                      # tiny_random model, 20 steps, batch 4
    python benchmarks/bench_guidance.py --model shapes --steps 30 --repeats 3
    python benchmarks/bench_guidance.py --scales 7.5 0 1      # w = 0 / 1 rows skip a pass under any schedule

Prints a Markdown table: UNet rows evaluated, what full CFG (2 rows per image per iteration) would evaluate,
the saving, and the median wall time of the denoise loop (no VAE decode). Where a schedule makes w = 1 (cutoff,
interval outside its range, the first iterations of linear/cosine/warmup) the cfg rule skips the
unconditional half-batch; rules whose output depends on both predictions at w = 1 (apg with momentum) skip
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stablefused.guidance import Guidance
from stablefused.models import load_components
from stablefused.pipeline import Sampler
from stablefused.sampling import Request, denoise

VARIANTS = [
    ("constant", {}, "cfg", {}),
    ("linear", {}, "cfg", {}),
    ("cosine", {}, "cfg", {}),
    ("interval", {}, "cfg", {}),
    ("cutoff", {"frac": 0.5}, "cfg", {}),
    ("cutoff", {"frac": 0.25}, "cfg", {}),
    ("warmup", {}, "cfg", {}),
    ("constant", {}, "rescaled_cfg", {}),
    ("constant", {}, "apg", {}),
    ("constant", {}, "apg", {"momentum": -0.5}),
    ("constant", {}, "cfg_zero_star", {}),
    ("cutoff", {"frac": 0.5}, "apg", {}),
    ("cutoff", {"frac": 0.5}, "apg", {"momentum": -0.5}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_random", help="tiny_random, shapes (bundled) or a diffusers folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--scales", type=float, nargs="+", default=[7.5])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    if args.model == "tiny_random":
        mcfg = {"name": "tiny_random", "builtin": "tiny_random"}
    elif args.model == "shapes":
        mcfg = {"name": "shapes", "bundled": "shapes"}
    else:
        mcfg = {"name": args.model, "path": args.model}
    comps = load_components(mcfg, "auto", "float32")
    sampler = Sampler(comps)
    size = comps.family.default_size
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    prompts = [prompts[i % 2] for i in range(args.batch)]
    scales = [args.scales[i % len(args.scales)] for i in range(args.batch)]
    cond, uncond = sampler.encode(prompts), sampler.encode([""] * args.batch)
    latents, gens = sampler.initial_latents(list(range(args.batch)), size, size, steps=args.steps)

    print(f"model {args.model}, {args.steps} steps, batch {args.batch}, scales {args.scales}, "
          f"{args.threads} thread(s), device {comps.device}\n")
    print("| schedule | rule | UNet rows | full CFG rows | saving | loop time (s) |")
    print("|---|---|---|---|---|---|")
    for sched, params, rule, rparams in VARIANTS:
        g = Guidance.from_config({"schedule": sched, "params": params, "rule": rule, "rule_params": rparams})
        times = []
        for _ in range(args.repeats):
            sampler.prepare(args.steps, list(range(args.batch)))
            t0 = time.perf_counter()
            _, ctx = denoise(sampler.family, sampler.scheduler, Request(latents.clone(), cond, uncond, scales, args.steps),
                             guidance=g, progress=False)
            times.append(time.perf_counter() - t0)
        rows, full = ctx.stats["unet_rows"], 2 * args.batch * len(ctx.timesteps)
        label = lambda n, p: n + (f"({', '.join(f'{k}={v}' for k, v in p.items())})" if p else "")
        print(f"| {label(sched, params)} | {label(rule, rparams)} | {rows} | {full} | {100 * (1 - rows / full):.1f}% "
              f"| {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
