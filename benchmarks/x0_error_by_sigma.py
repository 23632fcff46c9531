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

from stablefused.scenes import data, evaluate
from stablefused.shapes.train import text_conditioning, to_tensor

SIGMAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)


@torch.no_grad()
def x0_errors(comps, images, prompts, sigmas=SIGMAS, seed: int = 1) -> list[float]:
    from diffusers import DDPMScheduler

    vcfg = comps.vae.config
    scale, shift = vcfg.scaling_factor, vcfg.get("shift_factor") or 0.0
    z0 = (comps.vae.encode(to_tensor(images)).latent_dist.mean - shift) * scale
    flow = comps.family.prediction_type == "flow"
    ids = comps.tokenizer(list(prompts), padding="max_length", max_length=comps.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    mods = {k: comps.modules[k] for k in ("text_encoder", "text_encoder_2") if comps.modules.get(k) is not None}
    dim = comps.text_encoder.config.hidden_size
    cond = text_conditioning(mods, ids, types.SimpleNamespace(arch="sd3" if flow else "unet", text_dim=dim,
                                                              max_sequence_length=4))
    alphas = DDPMScheduler(**{k: comps.scheduler_config[k] for k in ("beta_schedule", "beta_start", "beta_end")
                              if k in comps.scheduler_config}).alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas:
        eps = torch.randn(z0.shape, generator=g)
        if flow:
            s = sigma / (1 + sigma)
            zt = (1 - s) * z0 + s * eps
            v = comps.network(hidden_states=zt, timestep=torch.full((len(z0),), s * 1000), **cond).sample
            x0 = zt - s * v
        else:
            t = int(torch.argmin((((1 - alphas) / alphas).sqrt() - sigma).abs()))
            a = alphas[t]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            e = comps.network(zt, torch.full((len(z0),), t), cond["encoder_hidden_states"]).sample
            x0 = (zt - (1 - a).sqrt() * e) / a.sqrt()
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
