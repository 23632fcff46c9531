"""Wall time of StableFused's loop against diffusers and against an always-batched CFG loop.

    python benchmarks/bench_loop.py                    # tiny_random, CPU
    python benchmarks/bench_loop.py --model shapes     # the bundled model
    python benchmarks/bench_loop.py --model sd15 --device cuda --dtype float16 --size 512
    python benchmarks/bench_loop.py --model sd15_random --device cuda --dtype float16   # SD1.5 shapes, random weights

Same process, same components, same prompts/seeds, median of ``--repeats`` runs after one warm-up.
Rows of the table (ratio = ours / baseline; goals in brackets):

* guidance 7.5, our text-to-image vs ``StableDiffusionPipeline`` (goal <= 1.00)
* guidance 0 and guidance 1, our loop (skips the unneeded half-batch) vs the same loop forced to evaluate
  both halves, as a classic batched CFG loop does (goal <= 0.55)
"""

from __future__ import annotations

import argparse
from typing import Any
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline

from stablefused.guidance import Guidance, GuidanceRule, per_sample
from stablefused.models import build_tiny_random, load_components
from stablefused.pipeline import Sampler
from stablefused.sampling import Request, denoise


class AlwaysBatchedCFG(GuidanceRule):
    """CFG that evaluates [uncond, cond] for every row at every step (what diffusers does for w > 1)."""

    def __call__(self, cond, uncond, w, info):
        return uncond + per_sample(w, cond) * (cond - uncond)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds per function; one warm-up each, then the repeats interleaved so that drift (clocks,
    other processes) hits every function alike. ``clock``: wall time, or ``time.process_time`` (this
    process's CPU time: steadier on a shared CPU machine; meaningless on a GPU)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = clock()
            fn()
            sync()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def sd15_random():
    """Components with SD 1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) and random weights: the
    real per-step cost, without a download."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablefused.models import TINY_WORDS, _scheduler_dict, sd_components
    from stablefused.text import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer(TINY_WORDS, model_max_length=77)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=len(tok) + 8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return sd_components("sd15_random", tok, text, unet, vae, _scheduler_dict(sched))


def model_args(doc: str, model: str = "shapes", batch: int = 4, repeats: int = 5) -> argparse.ArgumentParser:
    """The options every benchmark takes: model, device, dtype, steps, batch, repeats."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=model)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: this process's CPU time (robust on a shared machine with one torch thread)")
    return ap


def clock_of(args) -> Any:
    """The timer ``--clock`` names."""
    return time.process_time if args.clock == "process" else time.perf_counter


def reference_pipeline(cls, comps):
    """The diffusers pipeline ``cls`` on the same components, with its own fresh DDIM scheduler, quiet."""
    pipe = cls(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
               scheduler=comps.make_scheduler("DDIMScheduler"), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(args):
    if args.model in ("tiny_random", "sd15_random"):
        comps = build_tiny_random() if args.model == "tiny_random" else sd15_random()
        dtype = getattr(torch, args.dtype)
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
        comps.device, comps.dtype = torch.device(args.device), dtype
        return comps
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
    size = args.size or comps.unet.config.sample_size * comps.vae_scale_factor
    prompts = ["a red circle"] * args.batch
    seeds = list(range(args.batch))
    sched = comps.make_scheduler("DDIMScheduler")
    sampler = Sampler(comps, sched)
    pipe = reference_pipeline(StableDiffusionPipeline, comps)
    always = Guidance(Guidance.default().schedule, AlwaysBatchedCFG())

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, steps=args.steps, height=size, width=size, progress=False)

    @torch.no_grad()
    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
             generator=gens, output_type="np")

    # The guidance 0/1 rows compare the denoising loop alone (prompts encoded and noise drawn beforehand).
    cond, uncond = sampler.encode(prompts), sampler.encode([""] * len(prompts))
    latents, _ = sampler.initial_latents(seeds, size, size, steps=args.steps)

    def loop(w, guidance=None):
        def run():
            sampler.prepare(args.steps, seeds)
            denoise(sampler.family, sched, Request(latents, cond, uncond, [w] * len(prompts), args.steps),
                    guidance=guidance, progress=False)

        return run

    t = timed({"ours": ours, "pipe": theirs, "w0": loop(0.0), "w0_full": loop(0.0, always), "w1": loop(1.0),
               "w1_full": loop(1.0, always)}, args.repeats)
    rows = [
        ("guidance 7.5: StableFused txt2img vs StableDiffusionPipeline", t["ours"], t["pipe"], "<= 1.00"),
        ("guidance 0: loop with half-batch skipping vs always-batched CFG loop", t["w0"], t["w0_full"], "<= 0.55"),
        ("guidance 1: loop with half-batch skipping vs always-batched CFG loop", t["w1"], t["w1_full"], "<= 0.55"),
    ]

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {size}x{size}, batch {args.batch}, {args.steps} DDIM steps, {args.dtype}, {dev}, "
          f"median of {args.repeats}")
    print()
    print_ratios(rows)


def print_ratios(rows: list[tuple]) -> None:
    """The Markdown table every benchmark prints: (comparison, ours s, baseline s, goal) per row."""
    print("| comparison | ours (s) | baseline (s) | ratio | goal |")
    print("|---|---|---|---|---|")
    for name, a, b, goal in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {goal} |")


if __name__ == "__main__":
    main()
