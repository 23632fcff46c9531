"""A 48-frame latent walk: StableFused's walk (frames batched through the one loop) vs the
stable-diffusion-videos way (one ``StableDiffusionPipeline`` call per frame with ``latents=`` and
``prompt_embeds=``), same components, same keyframe noises and embeddings, same per-frame inputs.

    OMP_NUM_THREADS=1 python benchmarks/bench_walk.py --model shapes      # bundled model, CPU (goal: ratio <= 0.5)

Both sides get the same frames (4 keyframes, a loop of 12 frames per segment, slerped noise, lerped text);
the time covers making the per-frame inputs, sampling and decoding (no file writing). Median of
``--repeats`` runs after a warm-up, interleaved. The largest pixel difference between the two sides' frames
is printed as a check that they compute the same walk.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import components, model_args, reference_pipeline  # noqa: E402

from stablefused import registry  # noqa: E402
from stablefused.guidance import Guidance  # noqa: E402
from stablefused.pipeline import Sampler  # noqa: E402
from stablefused.walk_render import make_keys, render  # noqa: E402
from stablefused.walkers import Walk, default_keyframes  # noqa: E402

PROMPTS = ["a red circle on a black background", "a large yellow square on a black background",
           "a small blue triangle on a white background", "a green circle on a white background"]


def main() -> None:
    ap = model_args(__doc__, batch=8, repeats=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    comps = components(args)
    size = comps.unet.config.sample_size * comps.vae_scale_factor
    cfg = OmegaConf.create({"eta": 0.0, "progress": False, "guidance_scales": [7.5], "height": size, "width": size,
                            "steps": args.steps, "model": {"height": size, "width": size}})
    run = SimpleNamespace(cfg=cfg, components=comps, sampler=Sampler(comps, comps.make_scheduler("DDIMScheduler")),
                          guidance=Guidance.default())
    walker = registry.create("walkers", "interpolate", text="lerp")
    walk = Walk(default_keyframes(PROMPTS, [0, 1, 2, 3]), [0, 1, 2, 3], 12, True, 12.0)
    frames = walker.plan(walk, walk.keyframes)
    pipe = reference_pipeline(StableDiffusionPipeline, comps)
    out = {}

    def ours():
        keys = make_keys(run, walk.keyframes, size, size)
        uncond = run.sampler.encode([""])
        out["ours"] = np.concatenate([render(run, walker, frames[i : i + args.batch], keys, uncond, args.steps).images
                                      for i in range(0, len(frames), args.batch)])

    def theirs():  # stable-diffusion-videos: per frame, interpolate the inputs and call the pipeline once
        keys = make_keys(run, walk.keyframes, size, size)
        uncond = run.sampler.encode([""])
        imgs = []
        for f in frames:
            pipe_out = pipe(prompt_embeds=walker.text([f], keys), negative_prompt_embeds=uncond,
                            latents=walker.noise([f], keys), num_inference_steps=args.steps, guidance_scale=7.5,
                            height=size, width=size, output_type="np")
            imgs.append(pipe_out.images)
        out["theirs"] = np.concatenate(imgs)

    fns = {"ours": ours, "theirs": theirs}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    t = {k: statistics.median(v) for k, v in times.items()}
    diff = float(np.abs(out["ours"] - out["theirs"]).max())

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {size}x{size}, {len(frames)}-frame walk (4 keyframes, loop), {args.steps} DDIM steps, "
          f"guidance 7.5, {args.dtype}, {dev}, median of {args.repeats}")
    print()
    print("| walk | ours: batches of {} through the loop (s) | one pipeline call per frame (s) | ratio | goal | "
          "max pixel difference |".format(args.batch))
    print("|---|---|---|---|---|---|")
    print(f"| {len(frames)} frames | {t['ours']:.2f} | {t['theirs']:.2f} | {t['ours'] / t['theirs']:.2f} | <= 0.50 | "
          f"{diff:.1e} |")


if __name__ == "__main__":
    main()
