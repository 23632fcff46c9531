"""Every scheduler config equals diffusers' StableDiffusionPipeline on a model folder with SD 1.5's own
scheduler config (``timestep_spacing: leading``, ``steps_offset: 1``), loaded from disk, and an image does not
depend on the batch it was sampled in.

Why this model: the tiny model built in code carries a DDIM config whose ``timestep_spacing`` is an unset
default, so ``from_config`` gives each σ-scheduler its own default (``linspace``), for which
``init_noise_sigma`` happens not to depend on the steps. SD 1.5's saved config says ``leading`` explicitly; then
Euler & co. have ``init_noise_sigma = sqrt(σ_max² + 1)`` with σ_max of *this run's* timesteps, and noise scaled
before ``set_timesteps`` was off by ~40 pixel levels (and differed between the first batch of a run and the
next ones).
"""

import numpy as np
import pytest
import yaml

from stablefused import runs
from stablefused.app import run
from stablefused.models import build_tiny_random, load_components, save_components
from stablefused.paths import config_dir
from stablefused.pipeline import Sampler
from tests.test_loop import reference as loop_reference
from tests.conftest import compose_cfg

# the schedulers of ε/v models (flow-matching ones, e.g. flow_heun, are tested with their families)
SCHEDULERS = sorted(p.stem for p in (config_dir() / "scheduler").glob("*.yaml")
                    if not str(yaml.safe_load(p.read_text()).get("cls") or "").startswith("FlowMatch"))
PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]
SEEDS = [3, 7]
STEPS, HEIGHT, WIDTH, SCALE = 6, 16, 24, 7.5
BATCH_STEPS = 4

# SD 1.5's scheduler/scheduler_config.json (stable-diffusion-v1-5), with the spacing its diffusers default
# implies written out, as save_pretrained writes it today.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "clip_sample": False, "prediction_type": "epsilon", "trained_betas": None,
}


def spec(name):
    s = yaml.safe_load((config_dir() / "scheduler" / f"{name}.yaml").read_text())
    return s["cls"], dict(s["overrides"] or {})


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_style")
    comps = build_tiny_random(seed=0)
    comps.scheduler_config = dict(SD15_SCHEDULER)
    save_components(comps, folder)
    return folder


@pytest.fixture(scope="module")
def sd15(sd15_folder):
    model = dict(name="sd15_style", builtin=None, bundled=None, hub_id=None, path=str(sd15_folder),
                 allow_pickle=False, prediction_type=None)
    comps = load_components(model, "cpu", "float32")
    # the real loading path kept SD 1.5's settings
    cfg = comps.scheduler_config
    assert cfg["_class_name"] == "PNDMScheduler"
    assert cfg["timestep_spacing"] == "leading" and cfg["steps_offset"] == 1 and cfg["clip_sample"] is False
    return comps


def reference(comps, scheduler, seeds=SEEDS):
    return loop_reference(comps, scheduler, PROMPTS, seeds, SCALE, steps=STEPS, height=HEIGHT, width=WIDTH, neg=NEG)


def reference_scheduler(comps, cls, overrides, seeds=SEEDS):
    sched = comps.make_scheduler(cls, **overrides)
    if hasattr(sched, "noise_sampler_seed"):
        # DPMSolverSDEScheduler ignores `generator`: its Brownian-tree noise comes from `noise_sampler_seed`
        # (random when unset). One seed per image, as our sampler seeds it, makes diffusers' run reproducible.
        sched = comps.make_scheduler(cls, **{"noise_sampler_seed": list(seeds), **overrides})
    return sched


def test_sd15_style_config_makes_init_noise_sigma_depend_on_the_steps(sd15):
    """The premise: with this config, Euler's init_noise_sigma differs before and after set_timesteps."""
    sched = sd15.make_scheduler("EulerDiscreteScheduler")
    before = float(sched.init_noise_sigma)
    sched.set_timesteps(STEPS)
    assert abs(before - float(sched.init_noise_sigma)) > 0.1


@pytest.mark.parametrize("name", SCHEDULERS)
def test_parity_with_diffusers_pipeline(sd15, name):
    cls, overrides = spec(name)
    ref = reference(sd15, reference_scheduler(sd15, cls, overrides))
    ours = Sampler(sd15, sd15.make_scheduler(cls, **overrides)).txt2img(
        PROMPTS, SEEDS, SCALE, NEG, steps=STEPS, height=HEIGHT, width=WIDTH, progress=False).images
    assert ours.shape == ref.shape == (2, HEIGHT, WIDTH, 3)
    assert np.isfinite(ours).all()
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-5, f"{name}: max |ours - diffusers| = {diff:.4g} ({diff * 255:.1f} pixel levels)"


@pytest.fixture
def floats(monkeypatch):
    """The float images the app's runner produces, in record order (the PNGs are 8-bit)."""
    out = []
    add = runs.Run.add_images

    def spy(self, images, records):
        out.extend(np.asarray(images))
        return add(self, images, records)

    monkeypatch.setattr(runs.Run, "add_images", spy)
    return out


@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_does_not_depend_on_its_batch(sd15_folder, tmp_path, floats, name):
    """Through the app (one scheduler per run, one sampler call per batch): 8 (prompt, seed) cells in batches
    of 1, 3 (3 + 3 + 2) and 8 give the same images. The first batch of a run meets a fresh scheduler. 4 steps:
    the app path is 24 sampled images per scheduler, and the step count does not matter here."""
    results = {}
    for bs in (1, 3, 8):
        floats.clear()
        cfg = compose_cfg(f"scheduler={name}", f"model.path={sd15_folder}", "prompts=[a red circle,a blue square]",
                          "seeds=[0,1,2,3]", "guidance_scales=[7.5]", "negative_prompt=green", f"steps={BATCH_STEPS}",
                          f"height={HEIGHT}", f"width={WIDTH}", f"batch_size={bs}")
        r = run(cfg, tmp_path / f"bs{bs}")
        assert len(r.records) == len(floats) == 8
        results[bs] = np.stack(floats)
    assert np.isfinite(results[8]).all()
    for bs in (1, 3):
        diff = float(np.abs(results[bs] - results[8]).max())
        assert diff <= 1e-5, f"{name}: batch_size={bs} vs 8 differ by {diff:.4g} ({diff * 255:.1f} pixel levels)"
