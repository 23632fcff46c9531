"""Where in noise level a scene model is weak: RMS error of its x0 prediction (VAE latent units, true prompt) per σ.

    OMP_NUM_THREADS=1 python benchmarks/x0_error_by_sigma.py scenes scenes_flow [folders ...] [--images 192]

σ = noise / signal for both kinds (ε models: x_t = √ᾱ x0 + √(1-ᾱ) ε at the training timestep nearest σ; flow
models: x_s = (1-s) x0 + s ε with s = σ / (1 + σ)); x0 is read from the prediction as each family's sampler
reads it and compared in unscaled latent units, so a UNet and a transformer sharing the VAE compare directly.
Low σ is detail (edges, a shape's corners); high σ is layout (where objects go, how many). Fresh scenes (seeds
8,500,000+), one noise draw per σ (seeded).
"""

from __future__ import annotations

import argparse
import types

import torch

from stablefused.guidance_gap import clean_latents, noised
from stablefused.scenes import data, evaluate

SIGMAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)


@torch.no_grad()
def x0_errors(comps, images, prompts, sigmas=SIGMAS, seed: int = 1) -> list[float]:
    from diffusers import DDPMScheduler

    from stablefused.pipeline import Sampler

    sampler = Sampler(comps)
    fam, scale = sampler.family, float(comps.vae.config.scaling_factor)
    z0 = clean_latents(comps, images)
    cond = sampler.encode(list(prompts))
    flow = fam.prediction_type == "flow"
    alphas = None if flow else DDPMScheduler.from_config(comps.scheduler_config).alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas:
        xt, t, signal, noise_coef = noised(z0, torch.randn(z0.shape, generator=g), sigma, alphas)
        pred = fam(xt, t, cond)  # velocity (flow) or ε
        x0 = xt - noise_coef * pred if flow else (xt - noise_coef * pred) / signal
        out.append(((x0 - z0) / scale).pow(2).mean().sqrt().item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="scenes, scenes_flow or trained folders")
    p.add_argument("--images", type=int, default=192)
    args = p.parse_args()
    images, prompts, _ = data.items(range(8_500_000, 8_500_000 + args.images))
    print("| model | " + " | ".join(f"σ {s:g}" for s in SIGMAS) + " |")
    print("|---" * (len(SIGMAS) + 1) + "|")
    for name in args.models:
        errs = x0_errors(evaluate.load(name), images, prompts)
        print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
