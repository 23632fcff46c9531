"""How hard a model's prompt pulls at each noise level: ‖ε_cond − ε_uncond‖ against σ, for in-domain images with
their own prompt and with a contradicting one (every colour word changed).

    python -m stablefused.guidance_gap shapes scenes scenes_flow [--images 64]

Why it matters: classifier-free guidance adds (w − 1)(ε_cond − ε_uncond). For the Bayes-optimal denoiser of
any data distribution, ε_cond − ε_uncond = −σ ∇_x log p(c | x_σ) (σ = noise / signal, x_σ = x0 + σ ε), so a
model whose implicit classifier p(c | x) is smooth — a real text-to-image model trained on loosely captioned
images — has a gap that shrinks in proportion to σ at low noise: the gap / σ column stays bounded. A gap that
stays large as σ → 0 means the prompt still rewrites an almost clean image, and image-to-image at low strength
(SDEdit), inpainting blends and guidance-interval experiments mislead. Gaps are relative: RMS of the difference
over RMS of the noise, per image, averaged; ε for flow models is x_s + (1 − s) v.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Sequence

import numpy as np
import torch

from stablefused.shapes.data import COLORS

SIGMAS = (0.1, 0.2, 0.35, 0.57, 1.0, 1.6, 3.0)  # 0.57: DDIM strength 0.2 on SD's schedule; 1.6: strength 0.5


def contradict(prompt: str) -> str:
    """The prompt with every colour word replaced by the next colour (red → green → … → purple → red)."""
    names = list(COLORS)
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[(names.index(m.group(1)) + 1) % len(names)],
                  prompt)


def world_of(model: str) -> str:
    """``scenes`` or ``shapes``: a bundled name, or a trained folder's ``training_args.json``."""
    import json
    from pathlib import Path

    args = Path(model) / "training_args.json"
    if args.exists():
        return json.loads(args.read_text()).get("world", "shapes")
    return "scenes" if model.startswith("scenes") else "shapes"


def world_items(world: str, n: int, first_seed: int = 8_000_000) -> tuple[np.ndarray, list[str]]:
    """Fresh in-domain images and their prompts of a world (``shapes`` or ``scenes``)."""
    if world == "scenes":
        from stablefused.scenes.data import items
    else:
        from stablefused.shapes.data import items
    imgs, prompts, _ = items(range(first_seed, first_seed + n))
    return imgs, prompts


@torch.no_grad()
def clean_latents(comps, images: np.ndarray) -> torch.Tensor:
    """The scaled (and shifted) VAE latents of images in [0, 1], in the family's layout."""
    vae = comps.vae
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(comps.device, comps.dtype) * 2 - 1
    shift = float(vae.config.get("shift_factor") or 0.0)
    return comps.family.from_spatial((vae.encode(x).latent_dist.mean - shift) * float(vae.config.scaling_factor))


def noised(z0: torch.Tensor, noise: torch.Tensor, sigma: float, alphas: torch.Tensor | None):
    """``(x_t, timestep, signal, noise coefficient)`` at noise/signal ``sigma``: flow (``alphas`` None)
    x_s = (1 - s) x0 + s ε with σ = s / (1 - s); else the training timestep whose noise/signal is nearest σ."""
    if alphas is None:
        sv = sigma / (1 + sigma)
        return (1 - sv) * z0 + sv * noise, torch.tensor(sv * 1000.0), 1 - sv, sv
    ti = int(torch.argmin((((1 - alphas) / alphas).sqrt() - sigma).abs()))
    a = float(alphas[ti])
    return a ** 0.5 * z0 + (1 - a) ** 0.5 * noise, torch.tensor(ti), a ** 0.5, (1 - a) ** 0.5


@torch.no_grad()
def gap_curve(comps, images: np.ndarray, prompts: Sequence[str], sigmas: Sequence[float] = SIGMAS,
              seed: int = 0) -> list[dict[str, float]]:
    """Per σ: the mean relative gap with the images' own prompts and with contradicting ones."""
    from diffusers import DDPMScheduler

    from stablefused.pipeline import Sampler

    s = Sampler(comps)
    fam = s.family
    z0 = clean_latents(comps, images)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    conds = {"match": s.encode(list(prompts)), "contradict": s.encode([contradict(p) for p in prompts])}
    uncond = s.encode([""] * len(prompts), negative=True)
    flow = fam.prediction_type == "flow"
    alphas = None if flow else DDPMScheduler.from_config(comps.scheduler_config).alphas_cumprod
    rows = []
    for sigma in sigmas:
        xt, t, signal, _ = noised(z0, noise, sigma, alphas)

        def eps(cond):
            out = fam(xt, t.to(comps.device), cond)
            return xt + signal * out if flow else out

        e_u = eps(uncond)
        row = {"sigma": float(sigma)}
        for name, cond in conds.items():
            d = (eps(cond) - e_u).flatten(1).pow(2).mean(1).sqrt() / noise.flatten(1).pow(2).mean(1).sqrt()
            row[name] = float(d.mean())
        rows.append(row)
    return rows


def markdown(curves: dict[str, list[dict[str, float]]]) -> list[str]:
    names = list(curves)
    lines = ["| σ | " + " | ".join(f"{n}: own prompt | {n}: contradicting | {n}: contradicting / σ" for n in names) + " |",
             "|---" * (1 + 3 * len(names)) + "|"]
    for i, sigma in enumerate(curves[names[0]]):
        cells = []
        for n in names:
            r = curves[n][i]
            cells += [f"{r['match']:.3f}", f"{r['contradict']:.3f}", f"{r['contradict'] / r['sigma']:.2f}"]
        lines.append(f"| {sigma['sigma']:g} | " + " | ".join(cells) + " |")
    return lines


def img2img_markdown(rates: dict[str, dict[float, dict[str, float]]]) -> list[str]:
    names = list(rates)
    lines = ["| strength | " + " | ".join(f"{n}: source colour kept | {n}: prompt colour" for n in names) + " |",
             "|---" * (1 + 2 * len(names)) + "|"]
    for st in rates[names[0]]:
        lines.append(f"| {st:g} | " + " | ".join(f"{rates[n][st]['source']:.2f} | {rates[n][st]['prompt']:.2f}"
                                                for n in names) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    from stablefused.scenes.evaluate import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="bundled model names (shapes, scenes, scenes_flow) or folders")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--img2img", type=int, default=0, metavar="N",
                   help="also image-to-image with a contradicting colour, N seeds per strength (guidance 7.5, 20 steps)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    curves, rates = {}, {}
    for m in a.models:
        comps = load(m)
        imgs, prompts = world_items(world_of(m), a.images)
        curves[m] = gap_curve(comps, imgs, prompts)
        if a.img2img:
            rates[m] = img2img_colours(comps, world_of(m), a.strengths, n=a.img2img)
    for line in markdown(curves):
        print(line)
    if rates:
        print()
        for line in img2img_markdown(rates):
            print(line)


def _source(world: str, seed: int) -> tuple[np.ndarray, str, str, str]:
    """A one-object source image of ``world``: (image, its colour, its shape, its background)."""
    rng = np.random.default_rng([4242, seed])
    colour = list(COLORS)[int(rng.integers(len(COLORS)))]
    if world == "scenes":
        from stablefused.scenes import data as sd

        scene = sd.make_scene(seed, category="single")
        scene.objects = scene.objects[:1]  # the named shape alone (a single scene may hold unnamed others)
        scene.objects[0].color = colour
        return sd.render(scene), colour, scene.objects[0].shape, scene.background
    from stablefused.shapes import data as shd

    attrs = shd.random_attrs(rng)
    attrs["color"] = colour
    return shd.image_for(attrs, seed), colour, attrs["shape"], attrs["background"]


def colour_of(world: str, image: Any) -> str | None:
    """The main object's colour as the world's analytic judge reads it (None: no object found)."""
    if world == "scenes":
        from stablefused.scenes.judge import detect

        objects = detect(image)[1]
        return max(objects, key=lambda o: o.side).color if objects else None
    from stablefused.shapes.classify import classify_image

    return classify_image(image)["color"]


def img2img_colours(comps, world: str, strengths: Sequence[float], n: int = 20, scale: float = 7.5,
                    steps: int = 20, first_seed: int = 0) -> dict[float, dict[str, float]]:
    """Image-to-image of one-object sources with a prompt naming another colour (same shape and background):
    per strength, the fraction of seeds whose output keeps the source's colour and the fraction that takes the
    prompt's. A real model keeps the source at low strength and follows the prompt at strength 1."""
    from PIL import Image

    from stablefused.pipeline import Sampler
    from stablefused.tasks.img2img import img2img

    sources, colours, prompts, wanted = [], [], [], []
    names = list(COLORS)
    for i in range(n):
        img, colour, shape, bg = _source(world, first_seed + i)
        other = names[(names.index(colour) + 1 + i % (len(names) - 1)) % len(names)]
        sources.append(Image.fromarray((img * 255).round().astype(np.uint8)))
        colours.append(colour)
        wanted.append(other)
        prompts.append(f"a {other} {shape} on a {bg} background")
    sampler = Sampler(comps)
    out = {}
    seeds = list(range(first_seed, first_seed + n))
    for strength in strengths:
        images = img2img(sampler, sources, prompts, seeds, [scale] * n, strength, steps=steps, progress=False).images
        got = [colour_of(world, im) for im in images]
        out[float(strength)] = {"source": float(np.mean([g == c for g, c in zip(got, colours)])),
                                "prompt": float(np.mean([g == w for g, w in zip(got, wanted)]))}
    return out


if __name__ == "__main__":
    main()
