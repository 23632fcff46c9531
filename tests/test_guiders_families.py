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
from tests.test_family_sd3 import diff, pipeline as sd3_pipeline
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
