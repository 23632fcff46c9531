"""Wall time of StableFused's loop against diffusers and against an always-batched CFG loop.

    python benchmarks/bench_loop.py                    # tiny_random, CPU
    python benchmarks/bench_loop.py --model shapes     # the bundled model
    python benchmarks/bench_loop.py --model sd15 --device cuda --dtype float16 --size 512

Same process, same components, same prompts/seeds, median of ``--repeats`` runs after one warm-up.
Rows of the table (ratio = ours / baseline; goals in brackets):

* guidance 7.5, our text-to-image vs ``StableDiffusionPipeline`` (goal <= 1.00)
* guidance 0 and guidance 1, our loop (skips the unneeded half-batch) vs the same loop forced to evaluate
  both halves, as a classic batched CFG loop does (goal <= 0.55)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline

from stablefused.guidance import Guidance, GuidanceRule, per_sample
from stablefused.models import build_tiny_random, load_components
from stablefused.pipeline import Sampler


class AlwaysBatchedCFG(GuidanceRule):
    """CFG that evaluates [uncond, cond] for every row at every step (what diffusers does for w > 1)."""

    def __call__(self, cond, uncond, w, info):
        return uncond + per_sample(w, cond) * (cond - uncond)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def components(args):
    if args.model == "tiny_random":
        return build_tiny_random()
    cfg = {"name": args.model, "builtin": None, "hub_id": None, "path": None, "bundled": None}
    if args.model == "shapes":
        cfg["bundled"] = "shapes"
    elif args.model == "sd15":
        cfg["hub_id"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    else:
        cfg["path"] = args.model
    return load_components(cfg, args.device, args.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    comps = components(args)
    if args.model == "tiny_random":
        comps.unet.to(args.device), comps.vae.to(args.device), comps.text_encoder.to(args.device)
        comps.device = torch.device(args.device)
    size = args.size or comps.unet.config.sample_size * comps.vae_scale_factor
    prompts = ["a red circle"] * args.batch
    seeds = list(range(args.batch))
    sched = comps.make_scheduler("DDIMScheduler")
    sampler = Sampler(comps, sched)
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=comps.make_scheduler("DDIMScheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    always = Guidance(Guidance.default().schedule, AlwaysBatchedCFG())

    def ours(w, guidance=None):
        return lambda: sampler.txt2img(prompts, seeds, w, steps=args.steps, height=size, width=size,
                                       guidance=guidance, progress=False)

    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
             generator=gens, output_type="np")

    rows = []
    t_ours, t_pipe = timed(ours(7.5), args.repeats), timed(theirs, args.repeats)
    rows.append(("guidance 7.5: StableFused vs StableDiffusionPipeline", t_ours, t_pipe, "<= 1.00"))
    for w in (0.0, 1.0):
        t_skip, t_full = timed(ours(w), args.repeats), timed(ours(w, always), args.repeats)
        rows.append((f"guidance {w:g}: half-batch skipping vs always-batched CFG", t_skip, t_full, "<= 0.55"))

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {size}x{size}, batch {args.batch}, {args.steps} DDIM steps, {args.dtype}, {dev}, "
          f"median of {args.repeats}")
    print()
    print("| comparison | ours (s) | baseline (s) | ratio | goal |")
    print("|---|---|---|---|---|")
    for name, a, b, goal in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {goal} |")


if __name__ == "__main__":
    main()
