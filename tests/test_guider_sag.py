"""Self-attention guidance (plugins/guidance_rule/sag.py) in the one loop: equal to diffusers'
StableDiffusionSAGPipeline on a tiny model loaded from disk with SD 1.5's scheduler config (DDIM and
DPM-Solver++, two SAG scales, the branches with and without CFG); the extra rows are counted; scale 0 is
plain CFG; σ-schedulers see the scaled input; families without a UNet mid block are refused in one line."""

import json
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionSAGPipeline

from stablefused import registry
from stablefused.guidance import Guidance, guider_problems
from stablefused.hooks import BaseHook
from stablefused.models import build_tiny_random
from stablefused.pipeline import Sampler
from tests.test_guiders_loop import NEG, PROMPTS, SEEDS, STEPS, Counting, H, W

from conftest import compose_cfg, run_loop, saved_sd15_style



@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_sag")
    comps = saved_sd15_style(folder)
    pipe = StableDiffusionSAGPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == "leading"  # SD 1.5's config came from disk
    return pipe, comps


def sag(**params):
    return Guidance.from_config({"schedule": "constant", "rule": "sag", "rule_params": params})


def reference(pipe, cls, prompts, negative, seeds, scale, sag_scale):
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, negative_prompt=negative, height=H, width=W, num_inference_steps=STEPS,
                guidance_scale=scale, sag_scale=sag_scale, generator=gens, output_type="np").images


def ours(comps, cls, scales, guidance=None, prompts=PROMPTS):
    return Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        prompts, SEEDS, scales, NEG, steps=STEPS, height=H, width=W, guidance=guidance, progress=False).images


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("scale,sag_scale", [(7.5, 0.75), (4.0, 1.5)])
def test_sag_equals_diffusers_sag_pipeline(sd15, cls, scale, sag_scale):
    pipe, comps = sd15
    ref = reference(pipe, cls, PROMPTS, NEG, SEEDS, scale, sag_scale)
    params = {} if sag_scale == 0.75 else {"scale": sag_scale}  # 0.75, blur 9 taps σ = 1: the pipeline's defaults
    got, plain = ours(comps, cls, scale, sag(**params)), ours(comps, cls, scale)
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(plain - ref).max() > 1e-2  # SAG really changed the images


def test_scales_one_and_zero_take_the_pipelines_branch_without_cfg(sd15):
    """w = 1: the pipeline at guidance_scale 1 (conditional prediction and attention, degraded input under the
    prompt); w = 0: the same branch on the unconditional prompt (the pipeline with the negative prompt as its
    prompt). One batch holds both rows."""
    pipe, comps = sd15
    got = ours(comps, DDIMScheduler, [1.0, 0.0], sag())
    ref_cond = reference(pipe, DDIMScheduler, PROMPTS[:1], None, SEEDS[:1], 1.0, 0.75)
    ref_uncond = reference(pipe, DDIMScheduler, NEG[1:], None, SEEDS[1:], 1.0, 0.75)
    assert np.abs(got[0] - ref_cond[0]).max() <= 1e-5
    assert np.abs(got[1] - ref_uncond[0]).max() <= 1e-5
    assert np.abs(ours(comps, DDIMScheduler, [1.0, 0.0])[0] - ref_cond[0]).max() > 1e-2


@pytest.fixture(scope="module")
def inputs64():
    s = Sampler(build_tiny_random())
    cond = s.encode(PROMPTS + PROMPTS[:1]).to(dtype=torch.float64)
    uncond = s.encode(NEG + NEG[:1]).to(dtype=torch.float64)
    latents, _ = s.initial_latents([3, 7, 9], 16, 16, steps=4)
    s.c.unet.double()
    return s, cond, uncond, latents.double()


def test_nfe_counts_the_degraded_rows(inputs64):
    """Scales 7.5, 1 and 0 in one batch: each step is one main call [u(7.5), u(0), c(7.5), c(1)] and one call
    of the three degraded rows; the loop's unet_rows/model_calls and the stats recorder's per-sample NFE and
    SAG term ‖ε_u − ε_degraded‖ match."""
    s, cond, uncond, latents = inputs64

    class Keep(BaseHook):
        states = []

        def on_step(self, state):
            self.states.append(state)

    net, stats, keep = Counting(s.c.unet), registry.create("recorders", "stats"), Keep()
    with torch.no_grad():
        _, ctx = run_loop(s, latents, cond, uncond, [7.5, 1.0, 0.0], 4, network=net, guidance=sag(),
                          hooks=[stats, keep])
    assert net.calls == ctx.stats["model_calls"] == 8
    assert net.rows == ctx.stats["unet_rows"] == 4 * (4 + 3)
    assert [o.shape[0] for o in net.outputs] == [4, 3] * 4
    out, _ = stats.result()
    v = {k: t for k, (t, _) in out.items()}
    assert v["stats.nfe"].tolist() == [[3] * 4, [2] * 4, [2] * 4]
    for i, st in enumerate(keep.states):
        term = (st.eps_uncond - st.predictions["dependent:sag"]).flatten(1).norm(dim=1)
        assert torch.allclose(v["stats.extra_delta_norm"][:, i].double(), term, rtol=1e-5)


def test_scale_zero_is_plain_cfg_at_cfg_cost(inputs64):
    s, cond, uncond, latents = inputs64
    a, b = Counting(s.c.unet), Counting(s.c.unet)
    out_cfg, _ = run_loop(s, latents, cond, uncond, [7.5, 1.0, 0.0], 3, network=a)
    out_sag, _ = run_loop(s, latents, cond, uncond, [7.5, 1.0, 0.0], 3, network=b, guidance=sag(scale=0.0))
    assert a.rows == b.rows == 3 * 4 and torch.equal(out_cfg, out_sag)


def test_sigma_scheduler_degrades_the_scaled_input(sd15):
    """Beyond the pipeline (it refuses float timesteps): under Euler the UNet's input is x/√(σ²+1), and SAG
    builds its degraded input there. SD 1.5's leading spacing gives Euler and DDIM the same first timestep and
    UNet input, so their first guided predictions agree; reading the unscaled latents would not."""
    _, comps = sd15

    class First(BaseHook):
        def on_step(self, state):
            if state.index == 0:
                self.eps = state.eps_guided

    got = {}
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        hook = First()
        Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
            PROMPTS, SEEDS, 7.5, NEG, steps=STEPS, height=H, width=W, guidance=sag(), hooks=[hook], progress=False)
        got[cls] = hook.eps
    assert (got[DDIMScheduler] - got[EulerDiscreteScheduler]).abs().max() <= 1e-4  # measured 9e-6 (w = 7.5)


def test_families_without_a_unet_mid_block_are_refused_in_one_line():
    cfg = {"guidance": {"rule": "sag"}, "scheduler": {"name": "default", "cls": None},
           "model": {"builtin": "tiny_sd3"}}
    from omegaconf import OmegaConf

    assert guider_problems(OmegaConf.create(cfg)) == [
        "guidance.rule=sag: defined for model families sd, sdxl only, not sd3"]
    cfg["model"] = {"builtin": "tiny_random"}
    assert guider_problems(OmegaConf.create(cfg)) == []

    class Family:
        name = "video"

    with pytest.raises(ValueError, match="^guidance.rule=sag: defined for model families sd, sdxl only, not video$"):
        sag().bind(Family())


def test_the_zoo_with_sag_runs_its_checks_before_loading(tmp_path):
    """The zoo's grid holds SAG and says ``skip_unsupported``: on SD3 SAG sits out with one warning and the other
    guiders run; a grid without it is refused in one line before the model loads."""
    from stablefused.api import run
    from stablefused.config import validate
    from stablefused.errors import ConfigError

    validate(compose_cfg("experiment=guidance_zoo", "model=shapes"))
    validate(compose_cfg("experiment=guidance_zoo", "model=tiny_sd3"))
    with pytest.raises(ConfigError, match=r"^guidance.grid\[\d+\]: guidance.rule=sag: defined for model families "
                                          r"sd, sdxl only, not sd3$"):
        validate(compose_cfg("experiment=guidance_zoo", "model=tiny_sd3", "guidance.skip_unsupported=false"))
    run("guidance_zoo", "model=tiny_sd3", "guidance.grid=[{rule: cfg},{rule: sag}]", "seeds=[0]",
                 "guidance_scales=[3.0]", "steps=2", "prompts=[a red circle]", "metrics=[]", run_dir=tmp_path / "zoo")
    assert [v["variant"] for v in json.loads((tmp_path / "zoo" / "guidance_grid.json").read_text())] == ["cfg"]


def test_bad_blur_settings_are_refused():
    with pytest.raises(registry.ParamError, match="blur_kernel=8: must be an odd positive integer"):
        sag(blur_kernel=8)
    with pytest.raises(registry.ParamError, match="blur_sigma=0.0: must be > 0"):
        sag(blur_sigma=0.0)
