"""Wall time of StableFused's one loop against each model family's diffusers pipeline, on the same components.

    python benchmarks/bench_families.py --family flux                 # tiny random Flux (dev-style), CPU
    python benchmarks/bench_families.py --family flux --size 256 --batch 2
    python benchmarks/bench_families.py --family flux --clock process   # CPU time: steadier on a busy machine

One function per family (``bench_<family>(args)``, each returning its table rows); the main prints them.
Same process, same components, same prompts/seeds, median of ``--repeats`` runs after one warm-up.
Rows (ratio = ours / baseline; goals in brackets):

* guidance 7.5, our text-to-image vs the family's pipeline at the same guidance (goal <= 1.00)
* guidance 0 and guidance 1, our loop (skips the unneeded half-batch) vs the same loop forced to evaluate
  both halves, as a classic batched CFG loop does (goal <= 0.55)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loop import AlwaysBatchedCFG, model_args, timed  # noqa: E402

from stablefused.guidance import Guidance  # noqa: E402
from stablefused.pipeline import Sampler  # noqa: E402
from stablefused.sampling import Request, denoise  # noqa: E402


def half_batch_rows(sampler, prompts, seeds, size, steps):
    """The guidance 0/1 rows: the denoising loop alone (prompts encoded and noise drawn beforehand), with
    half-batch skipping vs always batched."""
    always = Guidance(Guidance.default().schedule, AlwaysBatchedCFG())
    cond, uncond = sampler.encode(prompts), sampler.encode(["blurry"] * len(prompts), negative=True)
    latents, _ = sampler.initial_latents(seeds, size, size, steps=steps)

    def loop(w, guidance=None):
        def run():
            sampler.prepare(steps, seeds, height=size, width=size)
            denoise(sampler.family, sampler.scheduler, Request(latents, cond, uncond, [w] * len(prompts), steps),
                    guidance=guidance, progress=False)

        return run

    return {"w0": loop(0.0), "w0_full": loop(0.0, always), "w1": loop(1.0), "w1_full": loop(1.0, always)}


def table(t: dict, pipeline: str) -> list[tuple]:
    return [
        (f"guidance 7.5: StableFused txt2img vs {pipeline}", t["ours"], t["pipe"], "<= 1.00"),
        ("guidance 0: loop with half-batch skipping vs always-batched CFG loop", t["w0"], t["w0_full"], "<= 0.55"),
        ("guidance 1: loop with half-batch skipping vs always-batched CFG loop", t["w1"], t["w1_full"], "<= 0.55"),
    ]


def bench_flux(args) -> tuple[str, list[tuple]]:
    """Flux: our txt2img at w = 7.5 (true CFG with the negative prompt, one batched transformer call of
    [negative, positive] rows per step) vs ``FluxPipeline(true_cfg_scale=7.5, negative_prompt=...)`` (two
    calls per step); both dev-style (distilled guidance input 3.5)."""
    from diffusers import FluxPipeline

    from stablefused.families.flux import build_tiny_flux

    comps = build_tiny_flux(seed=0)
    dtype = getattr(torch, args.dtype)
    for m in comps.modules.values():
        if isinstance(m, torch.nn.Module):
            m.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
    comps.device, comps.dtype = torch.device(args.device), dtype
    size = args.size or 128
    prompts, negs = ["a red circle"] * args.batch, ["blurry"] * args.batch
    seeds = list(range(args.batch))
    sampler = Sampler(comps)
    m = comps.modules
    pipe = FluxPipeline(scheduler=comps.make_scheduler(), vae=m["vae"], text_encoder=m["text_encoder"],
                        tokenizer=m["tokenizer"], text_encoder_2=m["text_encoder_2"], tokenizer_2=m["tokenizer_2"],
                        transformer=m["transformer"])
    pipe.set_progress_bar_config(disable=True)

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, negs, steps=args.steps, height=size, width=size, progress=False)

    @torch.no_grad()
    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompts, negative_prompt=negs, true_cfg_scale=7.5, guidance_scale=3.5, height=size, width=size,
             num_inference_steps=args.steps, generator=gens, output_type="np",
             max_sequence_length=m["tokenizer_2"].model_max_length)

    t = timed({"ours": ours, "pipe": theirs,
               **half_batch_rows(sampler, prompts, seeds, size, args.steps)}, args.repeats, CLOCKS[args.clock])
    tokens = (size // sampler.family.size_multiple) ** 2
    head = (f"flux: tiny_flux (dev-style), {size}x{size} ({tokens} image tokens), batch {args.batch}, {args.steps} "
            f"flow-matching Euler steps, {args.dtype}")
    return head, table(t, "FluxPipeline (true_cfg_scale)")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
FAMILIES = {"flux": bench_flux}  # the SDXL and SD3 benchmarks add bench_sdxl / bench_sd3 here


def main() -> None:
    ap = model_args(__doc__, model="tiny", batch=4, repeats=5)
    ap.add_argument("--family", default="all", help=f"{', '.join(FAMILIES)} or all")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: per family)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or process: this process's CPU time (steadier on a shared CPU machine)")
    args = ap.parse_args()
    names = list(FAMILIES) if args.family == "all" else [args.family]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    for name in names:
        head, rows = FAMILIES[name](args)
        print(f"{head}, {dev}, median of {args.repeats} ({args.clock} clock)")
        print()
        print("| comparison | ours (s) | baseline (s) | ratio | goal |")
        print("|---|---|---|---|---|")
        for label, a, b, goal in rows:
            print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} | {goal} |")
        print()


if __name__ == "__main__":
    main()
