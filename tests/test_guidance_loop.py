"""Guidance plugins in the one loop on the tiny model: every schedule x rule, skipping == full computation,
the compute saved, the guidance_grid experiment and a -m sweep."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stablefused import registry
from stablefused.errors import ConfigError
from stablefused.guidance import Guidance
from stablefused.tasks.guidance_grid import variants
from stablefused.pipeline import Sampler

from conftest import compose_cfg, run_loop

SCHEDULES = registry.list_names("guidance_schedule")
RULES = registry.list_names("guidance_rule")
SCALES = [0.0, 1.0, 7.5, -2.0]


class FullPasses:
    """A rule with skipping disabled: both UNet passes for every row."""

    def __init__(self, rule):
        self.rule = rule

    def passes(self, w):
        both = torch.ones_like(w, dtype=torch.bool)
        return both, both

    def reset(self):
        self.rule.reset()

    def __call__(self, *args):
        return self.rule(*args)


@pytest.fixture(scope="module")
def inputs():
    """The tiny model's UNet in float64: in float32 the UNet's output for a row changes by ~1e-6 with the
    batch it is in (batch-size dependent kernels), which guidance at w = 7.5 amplifies past 1e-5; float64
    leaves only the rules' own arithmetic to compare."""
    from stablefused.models import build_tiny_random

    s = Sampler(build_tiny_random())
    cond = s.encode(["a red circle", "a blue square", "a red circle", "a blue square"]).to(dtype=torch.float64)
    uncond = s.encode([""] * 4).to(dtype=torch.float64)
    latents, _ = s.initial_latents([0, 1, 2, 3], 16, 16, steps=4)
    s.c.unet.double()
    return s, cond, uncond, latents.double()


def run(inputs, guidance, steps=4, scales=SCALES):
    s, cond, uncond, latents = inputs
    n = len(scales)
    with torch.no_grad():
        out, ctx = run_loop(s, latents[:n].clone(), cond.select(range(n)), uncond.select(range(n)), scales, steps,
                            guidance=guidance)
    return out, ctx


def test_builtins_registered():
    assert {"constant", "linear", "cosine", "interval", "cutoff", "warmup"} <= set(SCHEDULES)
    assert {"cfg", "rescaled_cfg", "apg", "cfg_zero_star"} <= set(RULES)


# guiders that need settings or a negative prompt run in tests/test_guiders_loop.py (every guider, NFE counted)
PARAMS = {"autoguidance": {"perturbation": "attention_dropout"}}
PLAIN_RULES = [r for r in RULES if r not in ("diffusers_config", "perp_neg")]


def test_every_schedule_with_every_rule(inputs):
    for sched, rule in itertools.product(SCHEDULES, PLAIN_RULES):
        g = Guidance.from_config({"schedule": sched, "rule": rule, "rule_params": PARAMS.get(rule, {})})
        out, ctx = run(inputs, g, steps=3, scales=[7.5, 0.0])
        assert torch.isfinite(out).all(), (sched, rule)
        rows = 3 if g.perturbations or rule == "sag" else 2  # a third prediction (perturbed, SAG's degraded) at most
        assert 0 < ctx.stats["unet_rows"] <= rows * 2 * 3, (sched, rule)


RULE_SETTINGS = [("cfg", {}), ("rescaled_cfg", {}), ("rescaled_cfg", {"phi": 0.0}), ("apg", {}),
                 ("apg", {"eta": 1.0}), ("apg", {"momentum": -0.5, "r": 2.0}), ("cfg_zero_star", {}),
                 ("cfg_zero_star", {"zero_steps": 1})]


@pytest.mark.parametrize("name,params", RULE_SETTINGS)
def test_skipping_equals_full_computation(inputs, name, params):
    # cutoff: w = 1 (no unconditional pass needed) in the second half; scales 0 and 1 skip from the start.
    skipped, ctx_s = run(inputs, Guidance.from_config(
        {"schedule": "cutoff", "rule": name, "rule_params": params}))
    g = Guidance.from_config({"schedule": "cutoff", "rule": name, "rule_params": params})
    full, ctx_f = run(inputs, Guidance(g.schedule, FullPasses(g.rule)))
    assert ctx_f.stats["unet_rows"] == 2 * 4 * 4
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)
    if not params.get("momentum"):
        assert ctx_s.stats["unet_rows"] < ctx_f.stats["unet_rows"]


def test_apg_momentum_is_reset_between_runs(inputs):
    g = Guidance.from_config({"schedule": "constant", "rule": "apg", "rule_params": {"momentum": -0.5}})
    a, _ = run(inputs, g)
    b, _ = run(inputs, g)  # the loop calls guidance.reset(): same result as a fresh instance
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("frac,saving", [(0.5, 0.25), (0.25, 0.375), (1.0, 0.0)])
def test_cutoff_saves_unet_rows(inputs, frac, saving):
    _, ctx = run(inputs, Guidance.from_config({"schedule": "cutoff", "params": {"frac": frac}}), scales=[7.5, 3.0])
    full = 2 * 2 * 4
    assert ctx.stats["unet_rows"] == round(full * (1 - saving))


def test_variants_inherit_label_and_check():
    g = OmegaConf.create({"schedule": "cutoff", "params": {"frac": 0.3}, "rule": "apg", "rule_params": {"eta": 1.0},
                          "grid": [{}, {"schedule": "linear"}, {"rule": "cfg", "label": "plain"}]})
    vs = variants(g)
    assert [v["label"] for v in vs] == ["cutoff / apg", "linear / apg", "plain"]
    same = variants({"schedule": "cutoff", "grid": [{"params": {"frac": 0.25}}, {"params": {"frac": 0.5}}]})
    assert [v["label"] for v in same] == ["cutoff(frac=0.25)", "cutoff(frac=0.5)"]
    assert vs[0]["params"] == {"frac": 0.3} and vs[1]["params"] == {"start": 0.0, "end": 2.0}
    assert vs[1]["rule_params"]["eta"] == 1.0 and vs[2]["rule_params"] == {}
    assert [v["label"] for v in variants({"schedule": "cosine", "rule": "cfg"})] == ["cosine / cfg"]
    with pytest.raises(ConfigError, match=r"grid\[0\].*linear.*frac"):
        variants({"schedule": "constant", "rule": "cfg", "grid": [{"schedule": "linear", "params": {"frac": 1}}]})
    with pytest.raises(ConfigError, match="unknown key"):
        variants({"grid": [{"sched": "linear"}]})


METRIC = '''
from stablefused.registry import register
import numpy as np

@register("metrics", "test_guidance_brightness")
class Brightness:
    """Mean pixel value (test metric)."""
    def __init__(self, scale: float = 1.0):
        self.scale = scale
    def __call__(self, images, records):
        return [{"brightness": self.scale * float(np.asarray(i).mean() / 255)} for i in images]
'''


def test_guidance_grid_experiment(tmp_path):
    from stablefused.app import run as app_run

    plugins = tmp_path / "plugins" / "metrics"
    plugins.mkdir(parents=True)
    (plugins / "test_guidance_brightness.py").write_text(METRIC)
    cfg = compose_cfg("experiment=guidance_schedules", "guidance=rules", "steps=2", "seeds=[0]",
                      "prompts=[a red circle, a blue square]")
    cfg.plugin_dirs = [str(tmp_path / "plugins")]
    cfg.metrics = {"test_guidance_brightness": {"_selected_": True, "scale": 1.0}}
    r = app_run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    compute = [x for x in recs if x["type"] == "compute"]
    assert [c["variant"] for c in compute] == ["cfg", "rescaled_cfg", "apg", "apg momentum", "cfg_zero_star"]
    assert all(c["unet_rows"] == c["full_cfg_rows"] == 2 * 2 * 2 for c in compute)  # w = 7.5: no skipping
    images = [x for x in recs if x["type"] == "image"]
    assert len(images) == 10 and {x["guidance_variant"] for x in images} == {c["variant"] for c in compute}
    assert all(0 <= x["brightness"] <= 1 for x in images)
    summary = json.loads((out / "guidance_grid.json").read_text())
    assert [s["variant"] for s in summary] == [c["variant"] for c in compute] and "brightness" in summary[0]
    assert (out / "grid.png").is_file() and (out / "metrics_by_variant.png").is_file()
    assert r.stats["unet_rows"] == sum(c["unet_rows"] for c in compute)


def test_multirun_sweep_over_schedules(tmp_path):
    cmd = [sys.executable, "-m", "stablefused", "-m", "experiment=guidance_schedules", "guidance=constant,cutoff",
           "model=tiny_random", "logger=none", "progress=false", "steps=2", "seeds=[0]", "prompts=[a red circle]",
           f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180, cwd=tmp_path)
    rows = {}
    for job in sorted(p for p in Path(tmp_path).iterdir() if p.is_dir() and p.name.isdigit()):
        recs = [json.loads(x) for x in (job / "manifest.jsonl").read_text().splitlines()]
        (compute,) = [x for x in recs if x["type"] == "compute"]
        rows[compute["schedule"]] = compute["unet_rows"]
    assert rows == {"constant": 4, "cutoff": 3}  # cutoff at 50%: 25% fewer UNet rows
