"""Wall time of StableFused's inpainting against ``StableDiffusionInpaintPipeline``.

    python benchmarks/bench_inpaint.py                      # bundled shapes model (4-channel UNet), CPU, 1 thread
    python benchmarks/bench_inpaint.py --model tiny_random

Same process, same components (DDIM), same sources, masks, prompts and per-image generators; for each
strength the two are run alternately (one warm-up each, then ``--repeats`` interleaved runs) and the median
compared. Both encode the sources with the VAE on every call (the pipeline also encodes the masked image,
which a 4-channel UNet does not use: StableFused only draws its random numbers). Neither pastes back.
Ratio = ours / diffusers (goal <= 1.00). The largest difference between the two outputs is printed too.
"""

from __future__ import annotations


import numpy as np
import torch
from diffusers import StableDiffusionInpaintPipeline

from bench_img2img import shape_sources
from bench_loop import components, model_args, reference_pipeline, timed
from stablefused import masks as mk
from stablefused.pipeline import Sampler
from stablefused.tasks.inpaint import inpaint


def main() -> None:
    ap = model_args(__doc__, batch=4, repeats=7)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.6, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    comps = components(args)
    size, sources = shape_sources(comps, args.batch)
    q = size // 4
    masks = [mk.draw([mk.parse_shape(f"rect:{q},{q},{3 * q},{3 * q}")], (size, size))] * args.batch
    prompts = ["a blue triangle on a white background"] * args.batch
    seeds = list(range(args.batch))
    sampler = Sampler(comps, comps.make_scheduler("DDIMScheduler"))
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, comps)

    print(f"model {args.model} ({comps.unet.config.in_channels}-channel UNet), {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), {size}x{size}, batch {args.batch}, {args.steps} DDIM steps, "
          f"guidance 7.5, mask = the middle {2 * q}x{2 * q}, median of {args.repeats} (interleaved)")
    print("| strength | steps run | diffusers (s) | stablefused (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for strength in args.strengths:
        def ours():
            return inpaint(sampler, sources, masks, prompts, seeds, [7.5] * args.batch, strength, steps=args.steps,
                           progress=False).images

        def theirs():
            return pipe(prompts, image=sources, mask_image=masks, height=size, width=size, strength=strength,
                        num_inference_steps=args.steps, guidance_scale=7.5,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images

        diff = float(np.abs(ours() - theirs()).max())
        t = timed({"diffusers": theirs, "stablefused": ours}, args.repeats)
        print(f"| {strength:g} | {int(strength * args.steps)} | {t['diffusers']:.3f} | {t['stablefused']:.3f} | "
              f"{t['stablefused'] / t['diffusers']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
