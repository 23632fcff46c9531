"""Wall time of StableFused's image-to-image against ``StableDiffusionImg2ImgPipeline``.

    python benchmarks/bench_img2img.py                      # bundled shapes model, CPU, 1 thread
    python benchmarks/bench_img2img.py --model tiny_random

Same process, same components (DDIM), same sources, prompts and per-image generators; for each strength the
two are run alternately (one warm-up each, then ``--repeats`` interleaved runs) and the median compared.
Both encode the sources with the VAE on every call. Ratio = ours / diffusers (goal <= 1.00). The largest
difference between the two outputs is printed too (they are the same computation).
"""

from __future__ import annotations


import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from bench_loop import components, model_args, reference_pipeline, timed
from stablefused import images as im
from stablefused.pipeline import Sampler
from stablefused.tasks.img2img import img2img

SOURCES = ["shapes:a red circle on a black background", "shapes:a purple square on a black background",
           "shapes:a small green triangle on a white background", "shapes:a yellow square on a white background"]


def shape_sources(comps, batch: int) -> tuple[int, list]:
    """The model's native size and ``batch`` sources drawn by the shapes renderer, fitted to it."""
    size = comps.unet.config.sample_size * comps.vae_scale_factor
    sources = [im.fit(s.image, "stretch", size, size) for s in im.load(SOURCES)]
    return size, (sources * batch)[:batch]


def main() -> None:
    ap = model_args(__doc__, batch=4, repeats=7)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    comps = components(args)
    size, sources = shape_sources(comps, args.batch)
    prompts = ["a blue triangle on a white background"] * args.batch
    seeds = list(range(args.batch))
    sampler = Sampler(comps, comps.make_scheduler("DDIMScheduler"))
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, comps)

    print(f"model {args.model}, {args.device} {args.dtype}, {torch.get_num_threads()} thread(s), {size}x{size}, "
          f"batch {args.batch}, {args.steps} DDIM steps, guidance 7.5, median of {args.repeats} (interleaved)")
    print("| strength | steps run | diffusers (s) | stablefused (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for strength in args.strengths:
        def ours():
            return img2img(sampler, sources, prompts, seeds, [7.5] * args.batch, strength, steps=args.steps,
                           progress=False).images

        def theirs():
            return pipe(prompts, image=sources, strength=strength, num_inference_steps=args.steps,
                        guidance_scale=7.5, generator=[torch.Generator().manual_seed(s) for s in seeds],
                        output_type="np").images

        diff = float(np.abs(ours() - theirs()).max())
        t = timed({"diffusers": theirs, "stablefused": ours}, args.repeats)
        print(f"| {strength:g} | {int(strength * args.steps)} | {t['diffusers']:.3f} | {t['stablefused']:.3f} | "
              f"{t['stablefused'] / t['diffusers']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
