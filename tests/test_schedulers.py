"""Every scheduler config runs through the loop on the tiny model, with x̂0 at every step."""


import numpy as np
import pytest
import yaml

from stablefused.hooks import BaseHook
from stablefused.paths import config_dir
from stablefused.pipeline import Sampler

SCHEDULERS = sorted(p.stem for p in (config_dir() / "scheduler").glob("*.yaml"))


class X0(BaseHook):
    def __init__(self):
        self.x0 = []

    def on_step(self, state):
        assert state.x0_pred is not None and state.x0_pred.shape == state.x_t.shape
        self.x0.append(state.x0_pred)


def test_the_common_schedulers_have_configs():
    for name in ["ddim", "ddpm", "pndm", "lms", "euler", "euler_ancestral", "heun", "kdpm2", "kdpm2_ancestral",
                 "dpm_multistep", "dpm_multistep_karras", "dpm_singlestep", "dpm_sde", "deis", "unipc"]:
        assert name in SCHEDULERS


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_runs(tiny, name):
    spec = yaml.safe_load((config_dir() / "scheduler" / f"{name}.yaml").read_text())
    if str(spec["cls"]).startswith("FlowMatch"):
        pytest.skip("a flow-matching scheduler: run on flow models (tests/test_family_sd3.py, test_family_gmm.py)")
    sched = tiny.make_scheduler(spec["cls"], **(spec["overrides"] or {}))
    hook = X0()
    out = Sampler(tiny, sched).txt2img(["a red circle", "a blue square"], [0, 1], [7.5, -2.0], steps=4,
                                       hooks=[hook], progress=False)
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()
    assert len(hook.x0) == len(sched.timesteps) >= 4
    assert all(torch_finite(x) for x in hook.x0)


def torch_finite(x):
    return bool(x.isfinite().all())
