"""Wall time of StableFused's loop on each model family against that family's diffusers pipeline, and
half-batch skipping against an always-batched CFG loop.

    python benchmarks/bench_families.py                      # every family, tiny random models, CPU
    python benchmarks/bench_families.py --family sd3         # one family
    python benchmarks/bench_families.py --family sd3 --model <SD3 diffusers folder> --device cuda --dtype bfloat16

Same process, same components, same prompts/seeds, median of ``--repeats`` runs after one warm-up (interleaved).
Rows per family (ratio = ours / baseline; goals in brackets):

* guidance 7.5, our text-to-image vs the family's pipeline (goal <= 1.00)
* guidance 0 and guidance 1, our loop (skips the unneeded half-batch) vs the same loop forced to evaluate
  both halves, as a classic batched CFG loop does (goal <= 0.55)

Each family adds a ``bench_<family>(args) -> (title, rows)`` function and an entry in ``FAMILIES``.
"""

from __future__ import annotations

import torch

from bench_loop import AlwaysBatchedCFG, model_args, timed
from stablefused.guidance import Guidance
from stablefused.pipeline import Sampler
from stablefused.sampling import Request, denoise


def half_batch_rows(sampler, prompts, seeds, steps, size, repeats) -> dict:
    """Seconds of the denoising loop alone (prompts encoded and noise drawn beforehand) at guidance 0 and 1,
    with half-batch skipping and always batched."""
    cond, uncond = sampler.encode(prompts), sampler.encode([""] * len(prompts))
    latents, _ = sampler.initial_latents(seeds, size, size, steps=steps)
    always = Guidance(Guidance.default().schedule, AlwaysBatchedCFG())

    def loop(w, guidance=None):
        def run():
            sampler.prepare(steps, seeds, height=size, width=size)
            denoise(sampler.family, sampler.scheduler, Request(latents, cond, uncond, [w] * len(prompts), steps),
                    guidance=guidance, progress=False)

        return run

    return {"w0": loop(0.0), "w0_full": loop(0.0, always), "w1": loop(1.0), "w1_full": loop(1.0, always)}


def skipping_rows(t: dict) -> list[tuple]:
    return [
        ("guidance 0: loop with half-batch skipping vs always-batched CFG loop", t["w0"], t["w0_full"], "<= 0.55"),
        ("guidance 1: loop with half-batch skipping vs always-batched CFG loop", t["w1"], t["w1_full"], "<= 0.55"),
    ]


# ---------------------------------------------------------------------------------------------- SD3 / 3.5
def sd3_components(args):
    """``tiny_sd3`` (built in code) by default, else a StableDiffusion3Pipeline folder (``--model``)."""
    from stablefused.models import load_components

    if args.model in (None, "tiny_sd3"):
        cfg = {"name": "tiny_sd3", "builtin": "tiny_sd3"}
    else:
        cfg = {"name": "sd3", "path": args.model}
    return load_components(cfg, args.device, args.dtype)


def bench_sd3(args) -> tuple[str, list[tuple]]:
    from diffusers import StableDiffusion3Pipeline

    comps = sd3_components(args)
    m = comps.modules
    size = args.size or comps.family.default_size
    prompts, seeds = ["a red circle"] * args.batch, list(range(args.batch))
    sampler = Sampler(comps)
    pipe = StableDiffusion3Pipeline(
        transformer=m["transformer"], scheduler=comps.make_scheduler(), vae=m["vae"], text_encoder=m["text_encoder"],
        tokenizer=m["tokenizer"], text_encoder_2=m["text_encoder_2"], tokenizer_2=m["tokenizer_2"],
        text_encoder_3=m["text_encoder_3"], tokenizer_3=m["tokenizer_3"])
    pipe.set_progress_bar_config(disable=True)
    msl = comps.family.max_sequence_length

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, steps=args.steps, height=size, width=size, progress=False)

    @torch.no_grad()
    def theirs():
        pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
             max_sequence_length=msl, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")

    t = timed({"ours": ours, "pipe": theirs,
               **half_batch_rows(sampler, prompts, seeds, args.steps, size, args.repeats)}, args.repeats)
    rows = [("guidance 7.5: StableFused txt2img vs StableDiffusion3Pipeline", t["ours"], t["pipe"], "<= 1.00"),
            *skipping_rows(t)]
    title = (f"sd3: {comps.name}, {size}x{size}, batch {args.batch}, {args.steps} FlowMatchEuler steps "
             f"(shift {comps.scheduler_config.get('shift')}), T5 {'yes' if m.get('text_encoder_3') else 'no'}")
    return title, rows


FAMILIES = {"sd3": bench_sd3}


def main() -> None:
    ap = model_args(__doc__, model=None, batch=4, repeats=5)
    ap.add_argument("--family", default="all", choices=["all", *FAMILIES])
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.dtype}, {dev}, median of {args.repeats}")
    for name, bench in FAMILIES.items():
        if args.family not in ("all", name):
            continue
        title, rows = bench(args)
        print()
        print(title)
        print()
        print("| comparison | ours (s) | baseline (s) | ratio | goal |")
        print("|---|---|---|---|---|")
        for what, a, b, goal in rows:
            print(f"| {what} | {a:.3f} | {b:.3f} | {a / b:.2f} | {goal} |")


if __name__ == "__main__":
    main()
