"""Write the example notebooks (``python examples/make_notebooks.py``): one per experiment of the README, each
on the bundled ``shapes`` model, offline, on a CPU, in well under two minutes. They are stored without outputs
and executed in a real Jupyter kernel by ``tests/test_notebooks.py`` (so CI fails when one breaks).

Edit the cells here, not in the .ipynb files, and run this script again."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
os.environ.setdefault("WANDB_MODE", "offline")   # logger="wandb" writes an offline run (wandb sync uploads it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import stablefused as sf
LOG = "none"   # "wandb" to log each run to Weights & Biases as the CLI does"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}  # name -> [(kind, source)]

NOTEBOOKS["negative_guidance"] = [
    ("md", """\
# What does negative guidance do?

`sf.run("negative_guidance", ...)` is `python -m stablefused experiment=negative_guidance ...`: the same config,
checks, run dir and images. Every prompt × seed under guidance −7.5 … 12, scored by `shapes_adherence`
(does the image have the prompted colour, shape, background?). Fewer seeds and steps than the README's run,
so it takes seconds on a CPU."""),
    ("code", SETUP),
    ("code", """\
res = sf.run("negative_guidance", seeds=[0], steps=10, logger=LOG)
res   # the grid, the denoising video and the table"""),
    ("md", "One row per image in `res.table` (a pandas DataFrame: the manifest's settings and every metric):"),
    ("code", """\
attrs = ["shapes_adherence/color", "shapes_adherence/shape", "shapes_adherence/background"]
by_scale = res.table.groupby("guidance_scale")[attrs].mean()
by_scale"""),
    ("code", """\
# Negative guidance does not give noise: it gives the *opposite* of the prompt (never its colour).
assert by_scale.loc[-7.5, "shapes_adherence/color"] < 0.2 < by_scale.loc[7.5, "shapes_adherence/color"]
res.images.where(guidance_scale=-7.5)   # the images at -7.5 (PIL images, with their manifest rows)"""),
    ("code", """\
img, row = next(res.images.where(guidance_scale=-7.5).items())
print(row["prompt"], "| seed", row["seed"], "| colour right:", row["shapes_adherence/color"])
img.resize((128, 128), 0)"""),
    ("md", "`res.videos` are shown inline; `res.dir` holds everything (PNGs, `manifest.jsonl`, plots):"),
    ("code", "res.videos[0]"),
    ("code", "sorted(p.name for p in res.dir.iterdir())"),
]

NOTEBOOKS["inside_denoising"] = [
    ("md", """\
# Inside the denoising process

What does the model think the image is at step *k*? `experiment=denoise_video` records the latents, the
predicted clean image x̂0 and per-step statistics; `res.records` loads them as tensors. The second half does
the same by hand with the lower-level API: load the model, make a sampler, pass a recorder object."""),
    ("code", SETUP),
    ("code", """\
res = sf.run("denoise_video", steps=10, logger=LOG)
rec = res.records
rec["x0"].shape, rec.steps("x0")     # (samples, steps, C, H, W)"""),
    ("code", "res.videos[0]   # x_t | predicted x0, one frame per step"),
    ("code", """\
import matplotlib.pyplot as plt
delta = rec.stats["guidance_delta_norm"]          # (samples, steps): ||eps_cond - eps_uncond||
fig, ax = plt.subplots(figsize=(5, 3))
for i, s in enumerate(rec.samples("x0")):
    ax.plot(rec.steps("x0"), delta[i].float(), label=s["prompt"])
ax.set_xlabel("step"); ax.set_ylabel("guidance delta norm"); ax.legend(fontsize=6)
plt.show()"""),
    ("md", """\
## The same loop, by hand

`sf.load_model` returns the cached components (no second load), `sf.sampler` a sampler with a scheduler from
`conf/scheduler/`, and `sf.plugins.<kind>.<name>(...)` any plugin, its parameters checked as config checks
them. `sampler.txt2img` runs the one denoising loop and returns images, latents and the loop context."""),
    ("code", """\
model = sf.load_model("shapes")
sampler = sf.sampler(model, "ddim")
x0 = sf.plugins.recorders.x0(every=4)
gen = sampler.txt2img(["a large green square on a black background"], [0], 7.5, steps=10, hooks=[x0])
tensors, info = x0.result()
steps_x0, _ = tensors["x0"]                        # (1 sample, recorded steps, C, h, w)
print(info["steps"], tuple(steps_x0.shape))
frames = sf.to_pil(sampler.decode(steps_x0[0].to(model.dtype)))   # x0 decoded at each recorded step
final = sf.to_pil(gen)[0]
assert info["steps"] == [0, 4, 8, 9]   # every 4th step, and the last one
sf.ImageList(frames + [final], []).sheet(cols=len(frames) + 1)"""),
]

NOTEBOOKS["img2img_strength"] = [
    ("md", """\
# Image-to-image: how much of the source survives?

Two sources drawn by the shapes renderer, two target prompts that change colour, shape and background, a
few strengths. `shapes_adherence` scores each output against the prompt (the edit) and against the source
(faithfulness)."""),
    ("code", SETUP),
    ("code", """\
res = sf.run("img2img_strength", seeds=[0, 1], strengths=[0.2, 0.5, 0.8, 1.0], guidance_scales=[7.5],
             steps=10, logger=LOG)
res.grid"""),
    ("code", """\
cols = [c for c in res.table.columns if c.endswith("/mean")]
tradeoff = res.table.groupby("strength")[cols].mean()
tradeoff"""),
    ("code", """\
edit, faithful = tradeoff[cols[0]], tradeoff[cols[1]]
assert edit.loc[1.0] > edit.loc[0.2] and faithful.loc[0.2] > faithful.loc[1.0]   # the trade-off
tradeoff.plot(marker="o", figsize=(5, 3));"""),
    ("md", "A source of your own: a PNG path, a folder, or `shapes:<description>`; `resize` fits it to the model:"),
    ("code", """\
one = sf.run(task="img2img", init_image="shapes:a large yellow circle on a white background",
             prompts=["a green square on a black background"], seeds=[0], strengths=[0.3, 0.6, 0.9], steps=10,
             logger=LOG)
one.grid"""),
]

NOTEBOOKS["inpainting"] = [
    ("md", """\
# Inpainting

The white part of the mask is repainted towards the prompt; with `paste_back` (default) every pixel outside
it is the source's. `mask` takes rectangles and circles in pixels, `mask_image` a PNG."""),
    ("code", SETUP),
    ("code", """\
res = sf.run("inpaint", seeds=[0], strengths=[0.6, 1.0], steps=10, logger=LOG)
res.grid"""),
    ("code", """\
t = res.table
t[["prompt", "source", "strength", "outside_change", "shapes_adherence/color"]]"""),
    ("code", """\
assert (t["outside_change"] < 0.01).all()   # pasted back: outside the mask the source stays (the blurred seam aside)
t.groupby("strength")["shapes_adherence/color"].mean()"""),
    ("code", """\
circle = sf.run(task="inpaint", init_image="shapes:a large red square on a black background",
                mask=["circle:16,16,7"], prompts=["a blue circle on a black background"], seeds=[0, 1],
                steps=10, logger=LOG)
circle.grid"""),
]

NOTEBOOKS["latent_walk"] = [
    ("md", """\
# A latent walk

Keyframes (prompt, seed) joined by frames whose noise and text embedding move along a walker's path; the
frame at each keyframe is exactly that prompt and seed's text-to-image image. The video plays inline."""),
    ("code", SETUP),
    ("code", """\
res = sf.run("latent_walk", segment_frames=4, steps=8, logger=LOG)
res.videos[0]"""),
    ("code", """\
frames = res.table   # one row per frame: segment, position, the keyframes mixed and their weights
frames[["time", "keyframe", "position", "prompt"]].head(8)"""),
    ("code", """\
assert len(res.images) == 4 * 4   # a loop through 4 keyframes, 4 frames each
res.images.sheet(cols=8)"""),
    ("md", "Another walker, built in Python: a circle in noise space around the first keyframe."),
    ("code", """\
walk = sf.run(task="walk", walker=sf.plugins.walkers.circle(text="fixed"), prompts=["a red circle on a black background"],
              seeds=[3], segment_frames=8, steps=8, logger=LOG)
walk.videos[0]"""),
]

NOTEBOOKS["guidance_schedules"] = [
    ("md", """\
# Guidance schedules and rules

A schedule sets the scale at each step, a rule combines the conditional and unconditional predictions.
`experiment=guidance_schedules` puts every schedule side by side in one grid and counts the UNet rows each
one needs (a step at scale 1 skips the unconditional half)."""),
    ("code", SETUP),
    ("code", """\
import pandas as pd
res = sf.run("guidance_schedules", seeds=[0], steps=10, logger=LOG)
compute = pd.DataFrame([r for r in res.manifest if r["type"] == "compute"])
res.grid"""),
    ("code", """\
compute[["variant", "unet_rows", "full_cfg_rows", "saving"]]"""),
    ("code", """\
rows = dict(zip(compute["variant"], compute["unet_rows"]))
assert rows["cutoff"] < rows["constant"]   # cutoff stops guiding half way: fewer UNet rows
rules = sf.run("guidance_schedules", guidance="rules", seeds=[0], steps=10, logger=LOG)
rules.grid"""),
    ("md", """\
Rules and schedules are plugins; build them in Python and hand them to a run (they are used as they are,
and the run dir's config records their parameters):"""),
    ("code", """\
g = sf.Guidance(sf.plugins.guidance_schedule.cutoff(frac=0.3), sf.plugins.guidance_rule.apg(momentum=-0.5))
mine = sf.run(task="txt2img", guidance=g, seeds=[0, 1], guidance_scales=[3, 7.5, 12], steps=10, logger=LOG)
print(mine.config.guidance)
mine"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes no file that did not change
        cell.id = f"{name[:40]}-{i}"
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(name, cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
