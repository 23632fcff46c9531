"""Perturbed guiders on the other model families, against diffusers' own pipelines on tiny random models
saved to disk and loaded back with their realistic scheduler configs:

* PAG on SDXL equals ``StableDiffusionXLPAGPipeline`` (its default ``pag_applied_layers="mid"``, which is our
  per-family default) for two (guidance_scale, pag_scale) pairs and two schedulers;
* SLG on SD3 equals ``StableDiffusion3Pipeline(skip_guidance_layers=...)`` with a start/stop window that
  switches the skip-layer term on and off within the run (``window="pipeline"``: the pipeline counts the
  window as ``start·n < i < stop·n``, diffusers' ``SkipLayerGuidance`` guider class, our default, as
  ``int(start·n) < i < int(stop·n)``).

Each comparison also checks that plain CFG (and a wrong layer or the other window count) is far from the
reference, so the parity cannot hold by accident."""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler, EulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusionXLPAGPipeline,
)

from stablefused.families.sd3 import build_tiny as build_tiny_sd3
from stablefused.families.sdxl import build_tiny_sdxl
from stablefused.guidance import Guidance
from stablefused.models import save_components
from stablefused.pipeline import Sampler
from tests.test_family_sd3 import _load as load_sd3
from tests.test_family_sd3 import MSL, diff, pipeline as sd3_pipeline  # MSL: the T5 tokens _load sets
from tests.test_family_sdxl import _save_and_load as save_and_load_sdxl

PROMPTS, SEEDS, NEG = ["a red circle", "a small blue square on black"], [3, 7], ["green", "a small triangle"]


def guidance(rule, **params):
    return Guidance.from_config({"schedule": "constant", "rule": rule, "rule_params": params})


# ------------------------------------------------------------------------------------------------ SDXL PAG
H, W, STEPS_XL = 16, 24, 5  # not square: SDXL's time_ids hold (height, width)
SDXL_SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_pag") / "sdxl"
    comps = save_and_load_sdxl(build_tiny_sdxl(seed=3), folder)  # SDXL's scheduler config written to disk
    return folder, comps


def sdxl_pag_reference(folder, cls, scale, pag_scale, negative):
    pipe = StableDiffusionXLPAGPipeline.from_pretrained(folder, add_watermarker=False)
    assert pipe.pag_applied_layers == ["mid"]  # the pipeline's default, what ours must select without layers
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "leading"  # SDXL's config, from disk
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=STEPS_XL,
                guidance_scale=scale, pag_scale=pag_scale, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                output_type="np").images


def sdxl_ours(comps, cls, scale, negative, g=None):
    return Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        PROMPTS, SEEDS, scale, negative or [""] * len(PROMPTS), steps=STEPS_XL, height=H, width=W, guidance=g,
        progress=False).images


# empty negatives (zeroed: force_zeros_for_empty_prompt) and real ones
@pytest.mark.parametrize("sched,scale,pag_scale,negative", [("euler", 7.5, 3.0, NEG), ("dpmpp_2m", 4.0, 1.5, None)])
def test_sdxl_pag_equals_diffusers_sdxl_pag_pipeline(sdxl, sched, scale, pag_scale, negative):
    folder, comps = sdxl
    cls = SDXL_SCHEDULERS[sched]
    ref = sdxl_pag_reference(folder, cls, scale, pag_scale, negative)
    params = {} if pag_scale == 3.0 else {"scale": pag_scale}  # 3.0 and the layers: the defaults, as the pipeline's
    ours = sdxl_ours(comps, cls, scale, negative, guidance("pag", **params))
    plain = sdxl_ours(comps, cls, scale, negative)
    wrong_layer = sdxl_ours(comps, cls, scale, negative, guidance("pag", scale=pag_scale, layers=["up_blocks.0"]))
    err = float(np.abs(ours - ref).max())
    print(f"SDXL PAG {sched} w={scale} s={pag_scale}: max |ours - pipeline| = {err:.2e}")
    assert ours.shape == ref.shape == (2, H, W, 3) and float(ref.std()) > 0.01
    assert err <= 1e-5
    assert np.abs(plain - ref).max() > 1e-2  # the perturbation really changed the images
    assert np.abs(wrong_layer - ref).max() > 1e-3  # and which self-attention layers it perturbs matters


# ------------------------------------------------------------------------------------------------- SD3 SLG
STEPS_3 = 8


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Tiny SD3.5-shaped components with a 4-block transformer (build_tiny has 2), saved and loaded back with
    SD3's scheduler config (FlowMatchEuler, shift 3.0)."""
    comps = build_tiny_sd3(seed=1)
    torch.manual_seed(4)
    transformer = SD3Transformer2DModel.from_config({**comps.modules["transformer"].config, "num_layers": 4})
    comps.modules["transformer"] = transformer
    folder = save_components(comps, tmp_path_factory.mktemp("sd3_slg") / "sd3")
    loaded = load_sd3(folder)
    assert loaded.network.config.num_layers == 4 and loaded.scheduler_config["shift"] == 3.0
    return loaded


class Calls:
    """Rows the transformer evaluated, call by call."""

    def __init__(self, net):
        self.rows = []
        self.handle = net.register_forward_hook(lambda m, args, kw, out: self.rows.append(kw["hidden_states"].shape[0]),
                                                with_kwargs=True)

    def remove(self):
        self.handle.remove()


def sd3_slg_reference(comps, scale, slg):
    pipe = sd3_pipeline(comps)
    calls = Calls(pipe.transformer)
    final = {}

    def grab(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    try:
        images = pipe(prompt=PROMPTS, negative_prompt=NEG, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                      num_inference_steps=STEPS_3, height=16, width=16, max_sequence_length=MSL, output_type="np",
                      guidance_scale=scale, skip_guidance_layers=slg["layers"],
                      skip_layer_guidance_scale=slg["scale"], skip_layer_guidance_start=slg["start"],
                      skip_layer_guidance_stop=slg["stop"], callback_on_step_end=grab).images
    finally:
        calls.remove()
    return images, final["latents"], calls.rows


def sd3_ours(comps, scale, g=None):
    return Sampler(comps, comps.make_scheduler()).txt2img(PROMPTS, SEEDS, scale, NEG, steps=STEPS_3, guidance=g,
                                                          progress=False)


# start·n < i < stop·n: (1.6, 4.8) holds steps 2, 3, 4 and (0.08, 3.6) steps 1, 2, 3, each switching the term on
# and off within the 8 steps; int(start·n) < i < int(stop·n), the guider class's count, leaves out 4 and 3
SLG_CASES = [(7.5, dict(scale=2.8, layers=[1, 2], start=0.2, stop=0.6), [2, 3, 4]),
             (4.0, dict(scale=3.5, layers=[2], start=0.01, stop=0.45), [1, 2, 3])]


@pytest.mark.parametrize("scale,slg,window", SLG_CASES)
def test_sd3_slg_equals_diffusers_sd3_pipeline(sd3, scale, slg, window):
    ref_img, ref_lat, ref_rows = sd3_slg_reference(sd3, scale, slg)
    # the pipeline: one CFG call per step, plus a conditional-only call with the layers skipped inside its window
    assert ref_rows == [n for i in range(STEPS_3) for n in ([4, 2] if i in window else [4])]
    gen = sd3_ours(sd3, scale, guidance("slg", window="pipeline", **slg))
    err_img, err_lat = diff(gen.images, ref_img), diff(gen.latents, ref_lat)
    print(f"SD3 SLG w={scale} {slg}: max |ours - pipeline| images {err_img:.2e}, latents {err_lat:.2e}")
    assert float(ref_img.std()) > 0.01 and err_img <= 1e-5 and err_lat <= 1e-5
    assert gen.context.stats["unet_rows"] == sum(ref_rows)  # ours: the same rows, in one call per step
    far = {  # each away from the pipeline: plain CFG, no window, the guider class's window count, a wrong block
        "plain": (sd3_ours(sd3, scale), 1e-2),
        "every_step": (sd3_ours(sd3, scale, guidance("slg", window="pipeline", **{**slg, "start": None, "stop": None})),
                       1e-2),
        "guider_count": (sd3_ours(sd3, scale, guidance("slg", **slg)), 1e-3),
        "wrong_layer": (sd3_ours(sd3, scale, guidance("slg", window="pipeline", **{**slg, "layers": [3]})), 1e-3),
    }
    for name, (other, bound) in far.items():
        assert diff(other.images, ref_img) > bound, name


def test_sd3_slg_at_scale_one_is_the_pipelines_conditional_prediction(sd3):
    """guidance_scale 1: the pipeline runs no CFG and so no skip-layer pass (the conditional prediction
    alone); window=pipeline does the same, per row: scales [1, 7.5] in one batch give the pipeline's row at 1
    and its row at 7.5 with SLG. The guider-class count adds s (c − ε_skip) at w = 1."""
    scale, slg, window = SLG_CASES[0]
    ref_img, _, ref_rows = sd3_slg_reference(sd3, 1.0, slg)
    assert ref_rows == [2] * STEPS_3
    gen = sd3_ours(sd3, 1.0, guidance("slg", window="pipeline", **slg))
    assert diff(gen.images, ref_img) <= 1e-5 and gen.context.stats["unet_rows"] == sum(ref_rows)
    assert diff(sd3_ours(sd3, 1.0, guidance("slg", **slg)).images, ref_img) > 1e-3
    ref_guided, _, _ = sd3_slg_reference(sd3, scale, slg)
    mixed = sd3_ours(sd3, [1.0, scale], guidance("slg", window="pipeline", **slg))
    assert diff(mixed.images[0], ref_img[0]) <= 1e-5 and diff(mixed.images[1], ref_guided[1]) <= 1e-5
    # rows: the first needs only its conditional pass; the second both, and its skip pass inside the window
    assert mixed.context.stats["unet_rows"] == STEPS_3 * 3 + len(window)
