"""Overhead of the step recorders on the sampling loop, and VAE decode vs. linear preview.

    python benchmarks/bench_recorders.py                     # tiny model, CPU: markdown tables
    python benchmarks/bench_recorders.py --model sd15 --device cuda --batch 4 --steps 20

Loop time = one :func:`stablefused.sampling.denoise` call (prompts encoded beforehand). Every configuration
runs ``--repeats`` times, interleaved with the others so that load from other processes hits all alike; the
table gives the best (min) and median time per configuration, the best vs. no recorders, and (the steadier
measure on a busy machine) the time spent inside the recorders' hook calls (median) as % of the best loop
time without recorders. Attention's cost is mostly inside the UNet (its processors), so only the loop
comparison shows it.
Target: all recorders except attention ≤ 5 % of loop time; linear preview ≥ 20× faster than the VAE.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny_random", help="conf/model name (tiny_random, sd15, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from hydra import compose, initialize_config_dir

    from stablefused import registry
    from stablefused.models import load_components
    from stablefused.paths import config_dir
    from stablefused.pipeline import Sampler
    from stablefused.preview import linear_preview
    from stablefused.sampling import Request, denoise

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        mcfg = compose("config", overrides=[f"model={args.model}"]).model
    comps = load_components(mcfg, args.device, args.dtype)
    sampler = Sampler(comps)
    prompts = (list(mcfg.example_prompts) * args.batch)[: args.batch]
    cond, uncond = sampler.encode(prompts), sampler.encode([""] * args.batch)
    h, w = int(mcfg.height), int(mcfg.width)

    def sync() -> None:
        if comps.device.type == "cuda":
            torch.cuda.synchronize()

    class Timed:
        """Forwards the hook calls of ``hook`` and adds up the time spent in them."""

        def __init__(self, hook, clock: list):
            self.hook, self.clock = hook, clock

        def _timed(self, fn, *a):
            sync()
            t0 = time.perf_counter()
            out = fn(*a)
            sync()
            self.clock[0] += time.perf_counter() - t0
            return out

        def before_loop(self, ctx):
            return self._timed(self.hook.before_loop, ctx)

        def on_step(self, state):
            return self._timed(self.hook.on_step, state)

        def after_loop(self, ctx, latents):
            return self._timed(self.hook.after_loop, ctx, latents)

    def loop(hooks: list) -> tuple[float, torch.Tensor]:
        latents, gens = sampler.initial_latents(list(range(args.batch)), h, w, steps=args.steps)
        sync()
        t0 = time.perf_counter()
        out, _ = denoise(sampler.family, sampler.scheduler,
                         Request(latents, cond, uncond, [7.5] * args.batch, args.steps, generators=gens), hooks=hooks,
                         progress=False)
        sync()
        return time.perf_counter() - t0, out

    configs = {
        "none": [],
        "latents": ["latents"],
        "x0": ["x0"],
        "noise": ["noise"],
        "stats": ["stats"],
        "latents+x0+noise+stats": ["latents", "x0", "noise", "stats"],
        "attention": ["attention"],
    }
    loop([registry.create("recorders", n) for n in configs["latents+x0+noise+stats"]])  # warm up
    times: dict[str, list[float]] = {k: [] for k in configs}
    in_hooks: dict[str, list[float]] = {k: [] for k in configs}
    reference = None
    order = list(configs)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # no configuration always runs first
        for name in order:
            recs = configs[name]
            clock = [0.0]
            dt, out = loop([Timed(registry.create("recorders", n), clock) for n in recs])
            times[name].append(dt)
            in_hooks[name].append(clock[0])
            if reference is None:
                reference = out
            assert torch.equal(out, reference), f"recorders {name} changed the result"
    base = min(times["none"])
    rows = [{"recorders": k, "best_ms": 1000 * min(v), "median_ms": 1000 * statistics.median(v),
             "overhead_pct": 100 * (min(v) / base - 1), "hooks_ms": 1000 * statistics.median(in_hooks[k]),
             "hooks_pct": 100 * statistics.median(in_hooks[k]) / base} for k, v in times.items()]

    # decoding: every x̂0 of a run (steps x batch latents), VAE in batches of 16 vs. linear preview
    rec = registry.create("recorders", "x0", dtype=None)
    loop([rec])
    lat = rec.result()[0]["x0"][0].flatten(0, 1).to(comps.device, comps.dtype)
    preview = linear_preview(sampler, lat.float().cpu())
    dec_t, lin_t = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        sampler.decode(lat, 16)
        sync()
        dec_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        preview(lat)
        lin_t.append(time.perf_counter() - t0)
    decode = {"latents": len(lat), "vae_ms": 1000 * min(dec_t), "linear_ms": 1000 * min(lin_t),
              "speedup": min(dec_t) / min(lin_t), "preview": preview.source}
    result = {"model": args.model, "device": str(comps.device), "dtype": args.dtype, "batch": args.batch,
              "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(), "loop": rows,
              "decode": decode}
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    print(f"model={args.model} device={comps.device} dtype={args.dtype} batch={args.batch} steps={args.steps} "
          f"repeats={args.repeats} threads={torch.get_num_threads()}\n")
    print("| recorders | best loop ms | median loop ms | loop vs none (best) | time in recorders ms | "
          "= % of loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recorders']} | {r['best_ms']:.1f} | {r['median_ms']:.1f} | {r['overhead_pct']:+.1f} % | "
              f"{r['hooks_ms']:.2f} | {r['hooks_pct']:.1f} % |")
    print(f"\n| decode {decode['latents']} latents | ms (best) |\n|---|---:|")
    print(f"| VAE (batches of 16) | {decode['vae_ms']:.2f} |\n| linear preview ({decode['preview']}) | "
          f"{decode['linear_ms']:.3f} |\n| speedup | {decode['speedup']:.0f}x |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
