"""Guiders of more than two predictions: cost against the references.

    python benchmarks/bench_guiders.py                         # tiny_random, 20 DDIM steps, batch 4
    python benchmarks/bench_guiders.py --model sd15_random --batch 2 --repeats 3
    python benchmarks/bench_guiders.py --model shapes

1. PAG through our loop (``guidance.rule=pag``: [uncond, cond, perturbed] rows in one UNet call, identity
   attention on the mid block) vs diffusers' ``StableDiffusionPAGPipeline`` (same components, guidance 7.5,
   pag_scale 3.0, mid block): goal ratio <= 1.00.
2. A guider that needs a third prediction only inside a window, outside it: PAG whose window does not open in
   this run (start = 1 - 1e-9) vs plain CFG over the same run, i.e. the cost of carrying the guider (needs,
   batch plans, no perturbation installed) where it needs nothing extra: goal <= 1.05.
3. PAG perturbing the second half of the steps vs CFG, for scale (no goal: 3 rows instead of 2 on half the
   steps).
Prints a Markdown table of median wall times (denoise loop + decode for 1; loop only for 2 and 3).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPAGPipeline

from bench_loop import clock_of, components, model_args, print_ratios, reference_pipeline, timed

from stablefused.guidance import Guidance
from stablefused.pipeline import Sampler
from stablefused.sampling import Request, denoise


def main() -> None:
    ap = model_args(__doc__, model="tiny_random", batch=4, repeats=5)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    comps = components(args)
    size = comps.unet.config.sample_size * comps.vae_scale_factor
    prompts, seeds = ["a red circle"] * args.batch, list(range(args.batch))
    sampler = Sampler(comps, comps.make_scheduler("DDIMScheduler"))
    pipe = reference_pipeline(StableDiffusionPAGPipeline, comps)
    pipe.set_pag_applied_layers(["mid"])
    pag = lambda **kw: Guidance.from_config({"rule": "pag", "rule_params": kw})  # noqa: E731

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, steps=args.steps, height=size, width=size, progress=False,
                        guidance=pag())

    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5, pag_scale=3.0,
             generator=gens, output_type="np")

    cond, uncond = sampler.encode(prompts), sampler.encode([""] * len(prompts))
    latents, _ = sampler.initial_latents(seeds, size, size, steps=args.steps)

    def loop(guidance):
        def run():
            sampler.prepare(args.steps, seeds)
            request = Request(latents, cond, uncond, [7.5] * len(prompts), args.steps)
            denoise(sampler.family, sampler.scheduler, request, guidance=guidance(), progress=False)

        return run

    half = args.steps // 2
    t = timed({"ours": ours, "pipe": theirs,
               "window_closed": loop(lambda: pag(start=1.0 - 1e-9, stop=1.0)),
               "cfg": loop(lambda: Guidance.default()),
               "window_half": loop(lambda: pag(start=0.5, stop=1.0))}, args.repeats, clock_of(args))
    rows = [
        ("PAG 7.5 / 3.0: StableFused txt2img vs StableDiffusionPAGPipeline", t["ours"], t["pipe"], "<= 1.00"),
        (f"PAG whose window stays closed for all {args.steps} steps vs CFG (loop only)", t["window_closed"], t["cfg"], "<= 1.05"),
        (f"PAG perturbing steps {half + 1}..{args.steps} vs CFG (loop only)", t["window_half"], t["cfg"], "-"),
    ]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {size}x{size}, batch {args.batch}, {args.steps} DDIM steps, {args.dtype}, {dev}, "
          f"median of {args.repeats}, {args.clock} clock")
    print()
    print_ratios(rows)


if __name__ == "__main__":
    main()
