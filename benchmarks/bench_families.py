"""Each model family through StableFused's loop against its diffusers pipeline, on the same components.

    python benchmarks/bench_families.py                          # every family, tiny random models, CPU
    python benchmarks/bench_families.py --family sdxl --steps 10
    python benchmarks/bench_families.py --family sdxl --model sdxl_random --device cuda --dtype float16

Same process, same components, same prompts/seeds, median of ``--repeats`` runs after one warm-up (timing as
``bench_loop.py``). Rows per family (ratio = ours / baseline; goals in brackets):

* guidance 7.5: our text-to-image (and image-to-image) vs the family's pipeline (goal <= 1.00)
* guidance 0 and 1: our loop (skips the unneeded half-batch) vs the same loop forced to evaluate both halves,
  as a classic batched CFG loop does (goal <= 0.55)

Each family has one ``bench_<family>(args) -> (title, rows)`` function; ``main`` runs those asked for.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_loop import AlwaysBatchedCFG, clock_of, print_ratios, timed
from stablefused.guidance import Guidance
from stablefused.models import quiet_libraries
from stablefused.pipeline import Sampler
from stablefused.sampling import Request, denoise


def skipping_rows(sampler: Sampler, prompts: list[str], seeds: list[int], size: tuple[int, int], steps: int,
                  repeats: int, clock=time.perf_counter, negative: str = "") -> dict:
    """Seconds of the denoising loop alone at guidance 0 and 1, with half-batch skipping and always batched
    (prompts encoded and noise drawn beforehand). Shared by every family's section."""
    cond, uncond = sampler.encode(prompts), sampler.encode([negative] * len(prompts), negative=True)
    latents, _ = sampler.initial_latents(seeds, *size, steps=steps)
    always = Guidance(Guidance.default().schedule, AlwaysBatchedCFG())

    def loop(w, guidance=None):
        def run():
            sampler.prepare(steps, seeds, height=size[0], width=size[1])
            denoise(sampler.family, sampler.scheduler, Request(latents, cond, uncond, [w] * len(prompts), steps),
                    guidance=guidance, progress=False)
        return run

    return timed({"w0": loop(0.0), "w0_full": loop(0.0, always), "w1": loop(1.0), "w1_full": loop(1.0, always)},
                 repeats, clock)


def skipping_table(t: dict) -> list[tuple]:
    return [("guidance 0: loop with half-batch skipping vs always-batched CFG loop", t["w0"], t["w0_full"], "<= 0.55"),
            ("guidance 1: loop with half-batch skipping vs always-batched CFG loop", t["w1"], t["w1_full"], "<= 0.55")]


def _on(comps, device: str, dtype: str):
    dt = getattr(torch, dtype)
    for m in comps.modules.values():
        if isinstance(m, torch.nn.Module):
            m.to(device=device, dtype=dt).eval().requires_grad_(False)
    comps.device, comps.dtype = torch.device(device), dt
    return comps


# ---------------------------------------------------------------------------------------------- SDXL
def sdxl_random():
    """Components with SDXL base's architecture (UNet 320-640-1280 with 1/2/10 transformer layers, CLIP ViT-L
    + OpenCLIP bigG with projection, SDXL VAE) and random weights: the real per-step cost, without a download."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stablefused.families.sdxl import SDXL_SCHEDULER
    from stablefused.models import TINY_WORDS, Components, _scheduler_dict
    from stablefused.text import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer(TINY_WORDS, model_max_length=77)
    clip = dict(max_position_embeddings=77, vocab_size=len(tok) + 8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu", **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                     **clip))
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025, sample_size=1024)
    modules = dict(tokenizer=tok, text_encoder=te, tokenizer_2=tok, text_encoder_2=te2, unet=unet, vae=vae)
    return Components("sdxl_random", modules, _scheduler_dict(EulerDiscreteScheduler(**SDXL_SCHEDULER)),
                      torch.device("cpu"), torch.float32, info={"pipeline_config": {"force_zeros_for_empty_prompt": True}},
                      family_name="sdxl")


def sdxl_components(args):
    from stablefused.models import builtin_models, load_components

    if args.model in (None, "tiny_sdxl"):
        return _on(builtin_models()["tiny_sdxl"](), args.device, args.dtype)
    if args.model == "sdxl_random":
        return _on(sdxl_random(), args.device, args.dtype)
    return load_components({"name": "sdxl", "path": args.model}, args.device, args.dtype)  # a diffusers folder


def bench_sdxl(args) -> tuple[str, list[tuple]]:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from stablefused.tasks.img2img import img2img

    comps = sdxl_components(args)
    size = args.size or comps.family.default_size
    prompts, seeds = ["a red circle"] * args.batch, list(range(args.batch))
    sampler = Sampler(comps, comps.make_scheduler())
    parts = {k: comps.modules.get(k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                               "unet")}

    def pipeline(cls):
        pipe = cls(**parts, scheduler=comps.make_scheduler(), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    t2i, i2i = pipeline(StableDiffusionXLPipeline), pipeline(StableDiffusionXLImg2ImgPipeline)
    sources = [_source(size)] * args.batch

    def gens():
        return [torch.Generator().manual_seed(s) for s in seeds]

    t = timed({
        "ours": lambda: sampler.txt2img(prompts, seeds, 7.5, steps=args.steps, height=size, width=size, progress=False),
        "pipe": lambda: t2i(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
                            generator=gens(), output_type="np"),
        "ours_i2i": lambda: img2img(sampler, sources, prompts, seeds, [7.5] * args.batch, 0.6, steps=args.steps,
                                    progress=False),
        "pipe_i2i": lambda: i2i(prompts, image=sources, strength=0.6, num_inference_steps=args.steps,
                                guidance_scale=7.5, generator=gens(), output_type="np"),
    }, args.repeats)
    t.update(skipping_rows(sampler, prompts, seeds, (size, size), args.steps, args.repeats))
    rows = [("guidance 7.5: txt2img vs StableDiffusionXLPipeline", t["ours"], t["pipe"], "<= 1.00"),
            ("guidance 7.5: img2img (strength 0.6) vs StableDiffusionXLImg2ImgPipeline", t["ours_i2i"], t["pipe_i2i"],
             "<= 1.00")] + skipping_table(t)
    title = (f"SDXL: model {args.model or 'tiny_sdxl'}, {size}x{size}, batch {args.batch}, {args.steps} Euler steps "
             f"(SDXL's scheduler config)")
    return title, rows


def _source(size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse([size // 5, size // 5, 4 * size // 5, 4 * size // 5], fill="red")
    return img


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
    clock = clock_of(args)

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, steps=args.steps, height=size, width=size, progress=False)

    @torch.no_grad()
    def theirs():
        pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
             max_sequence_length=msl, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")

    t = timed({"ours": ours, "pipe": theirs}, args.repeats, clock)
    t.update(skipping_rows(sampler, prompts, seeds, (size, size), args.steps, args.repeats, clock))
    rows = [("guidance 7.5: StableFused txt2img vs StableDiffusion3Pipeline", t["ours"], t["pipe"], "<= 1.00"),
            *skipping_table(t)]
    return (f"sd3: {comps.name}, {size}x{size}, batch {args.batch}, {args.steps} FlowMatchEuler steps "
            f"(shift {comps.scheduler_config.get('shift')}), T5 {'yes' if m.get('text_encoder_3') else 'no'}"), rows


# ---------------------------------------------------------------------------------------------- Flux.1
def bench_flux(args) -> tuple[str, list[tuple]]:
    """Flux: our txt2img at w = 7.5 (true CFG with the negative prompt: two transformer calls per step, as
    the pipeline makes) vs ``FluxPipeline(true_cfg_scale=7.5, negative_prompt=...)``; both dev-style
    (distilled guidance input 3.5)."""
    from diffusers import FluxPipeline

    from stablefused.families.flux import build_tiny_flux

    comps = _on(build_tiny_flux(seed=0), args.device, args.dtype)
    size = args.size or 128
    prompts, negs = ["a red circle"] * args.batch, ["blurry"] * args.batch
    seeds = list(range(args.batch))
    sampler = Sampler(comps)
    m = comps.modules
    pipe = FluxPipeline(scheduler=comps.make_scheduler(), vae=m["vae"], text_encoder=m["text_encoder"],
                        tokenizer=m["tokenizer"], text_encoder_2=m["text_encoder_2"], tokenizer_2=m["tokenizer_2"],
                        transformer=m["transformer"])
    pipe.set_progress_bar_config(disable=True)
    clock = clock_of(args)

    def ours():
        sampler.txt2img(prompts, seeds, 7.5, negs, steps=args.steps, height=size, width=size, progress=False)

    @torch.no_grad()
    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompts, negative_prompt=negs, true_cfg_scale=7.5, guidance_scale=3.5, height=size, width=size,
             num_inference_steps=args.steps, generator=gens, output_type="np",
             max_sequence_length=m["tokenizer_2"].model_max_length)

    t = timed({"ours": ours, "pipe": theirs}, args.repeats, clock)
    t.update(skipping_rows(sampler, prompts, seeds, (size, size), args.steps, args.repeats, clock, negative="blurry"))
    rows = [("guidance 7.5: StableFused txt2img vs FluxPipeline (true_cfg_scale)", t["ours"], t["pipe"], "<= 1.00"),
            *skipping_table(t)]
    tokens = (size // sampler.family.size_multiple) ** 2
    return (f"flux: tiny_flux (dev-style), {size}x{size} ({tokens} image tokens), batch {args.batch}, {args.steps} "
            f"flow-matching Euler steps"), rows


# ---------------------------------------------------------------------------------------------- main
FAMILIES = {"sdxl": bench_sdxl, "sd3": bench_sd3, "flux": bench_flux}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: every family")
    ap.add_argument("--model", default=None, help="the family's model: its tiny one (default), <family>_random "
                    "(real architecture, random weights) or a diffusers folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="wall time, or process: this process's CPU time (steadier on a shared CPU machine)")
    args = ap.parse_args()
    quiet_libraries()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    for family in args.family or sorted(FAMILIES):
        title, rows = FAMILIES[family](args)
        print(f"{title}, {args.dtype}, {dev}, median of {args.repeats} ({args.clock} clock)")
        print()
        print_ratios(rows)
        print()


if __name__ == "__main__":
    main()
