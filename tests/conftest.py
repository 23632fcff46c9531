import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is as fast, and far faster when other processes share the CPU (no spinning
# OpenMP workers). Subprocesses (CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from stablefused.paths import config_dir  # noqa: E402


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny():
    from stablefused.models import build_tiny_random

    return build_tiny_random()


def compose_cfg(*overrides: str):
    """The app's config as ``python -m stablefused <overrides>`` composes it (defaults: tiny model, no logger)."""
    base = ["model=tiny_random", "logger=none", "progress=false"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


@pytest.fixture
def cfg_factory():
    return compose_cfg


def run_loop(sampler, latents, cond, uncond, scales, steps, *, network=None, start_step=0, extra_channels=None,
             generators=None, **loop_kw):
    """The loop on a prepared request, as tasks call it: ``Sampler.prepare`` sets the scheduler (the one owner
    of its state), then :func:`denoise`. ``network`` replaces the model's UNet (a wrapper under test)."""
    from dataclasses import replace

    from stablefused.sampling import Request, denoise

    family = sampler.family
    if network is not None:
        family = type(family)(replace(sampler.c, modules={**sampler.c.modules, "unet": network}))
    sampler.prepare(steps, list(range(len(latents))), start_step=start_step)
    request = Request(latents, cond, uncond, scales, steps, start_step=start_step, extra_channels=extra_channels,
                      generators=generators)
    loop_kw.setdefault("progress", False)
    return denoise(family, sampler.scheduler, request, **loop_kw)


def saved_sd15_style(folder):
    """A tiny random SD model saved to ``folder`` with SD 1.5's scheduler config and loaded back from disk (the
    reference pipelines load the same folder)."""
    from stablefused.models import build_tiny_random, load_components, save_components
    from tests.test_scheduler_parity import SD15_SCHEDULER

    comps = build_tiny_random(seed=0)
    comps.scheduler_config = dict(SD15_SCHEDULER)
    save_components(comps, folder)
    model = dict(name="sd15_style", builtin=None, bundled=None, hub_id=None, path=str(folder),
                 allow_pickle=False, prediction_type=None)
    return load_components(model, "cpu", "float32")
