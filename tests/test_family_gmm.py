"""model=gmm: the exact denoiser of a labelled Gaussian mixture, run through the one loop.

Checked against Monte-Carlo estimates (the closed form is what it claims), and sampling without guidance
(w = 1) against exact samples of p(x | c) (the loop and schedulers sample the right distribution)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stablefused.families.gmm import DEFAULT_COMPONENTS, build_gmm
from stablefused.pipeline import Sampler
from stablefused.truth import exact_samples, sliced_w2


@pytest.fixture(scope="module")
def gmm():
    return build_gmm()


def _posterior_mean_mc(x_t, c, n, label, rng, draws=400_000):
    """E[x0 | x_t] by self-normalised importance sampling: x0 ~ p(x0 | label), weights N(x_t; c·x0, n²)."""
    x0 = exact_samples(DEFAULT_COMPONENTS, [label] if label else [], draws, rng)
    logw = -((x_t[None] - c * x0) ** 2).sum(1) / (2 * n**2)
    w = np.exp(logw - logw.max())
    return (w[:, None] * x0).sum(0) / w.sum()


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "FlowMatchEulerDiscreteScheduler"])
@pytest.mark.parametrize("label", ["green", ""])
def test_denoiser_equals_monte_carlo_posterior_mean(gmm, scheduler, label):
    """The closed-form prediction, turned into x̂0, equals E[x0 | x_t] estimated by sampling x0."""
    s = Sampler(gmm, gmm.make_scheduler(scheduler))
    s.prepare(10, [0])
    net, rng = gmm.network, np.random.default_rng(0)
    cond = s.encode([label]).embeds
    for t in s.scheduler.timesteps[2:9:3]:
        c, n = (float(v) for v in net.process(t.reshape(1)))
        x_t = np.array([0.3, -0.8]) * c + rng.normal(size=2) * n
        pred = net(torch.tensor(x_t, dtype=torch.float32).reshape(1, 2, 1, 1), t, cond)[0].double().reshape(2).numpy()
        x0 = x_t - n * pred if net.flow else (x_t - n * pred) / c  # flow: x̂0 = x_t − s·v; VP: (x_t − n·ε̂)/a
        mc = _posterior_mean_mc(x_t, c, n, label, rng)
        assert np.abs(x0 - mc).max() < 0.02, (float(t), x0, mc)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_unguided_sampling_matches_the_conditional(gmm, scheduler):
    """w = 1 (the conditional model alone), 200 steps: samples of p(x | c) within sampling error."""
    s = Sampler(gmm, gmm.make_scheduler(scheduler))
    n = 1500
    for label in ("red", "green"):
        x = s.txt2img([label] * n, list(range(n)), 1.0, steps=200, progress=False).latents.reshape(n, 2).double().numpy()
        ref = exact_samples(DEFAULT_COMPONENTS, [label], n, np.random.default_rng(1))
        floor = sliced_w2(exact_samples(DEFAULT_COMPONENTS, [label], n, np.random.default_rng(2)), ref)
        d = sliced_w2(x, ref)
        assert d < max(2.5 * floor, 0.04), (label, d, floor)
    # a wrong sampler is caught: the same run at 3 steps is visibly off
    x = s.txt2img(["green"] * n, list(range(n)), 1.0, steps=3, progress=False).latents.reshape(n, 2).double().numpy()
    assert sliced_w2(x, exact_samples(DEFAULT_COMPONENTS, ["green"], n, np.random.default_rng(1))) > 0.05


def test_empty_prompt_is_the_unconditional_mixture(gmm):
    s = Sampler(gmm)
    n = 1500
    x = s.txt2img([""] * n, list(range(n)), 1.0, steps=100, progress=False).latents.reshape(n, 2).double().numpy()
    ref = exact_samples(DEFAULT_COMPONENTS, [], n, np.random.default_rng(3))
    floor = sliced_w2(exact_samples(DEFAULT_COMPONENTS, [], n, np.random.default_rng(4)), ref)
    assert sliced_w2(x, ref) < max(2.5 * floor, 0.04)
    # guidance 0 is the unconditional model too: any prompt, same points
    y = s.txt2img(["red"] * n, list(range(n)), 0.0, steps=100, progress=False).latents.reshape(n, 2).double().numpy()
    assert np.allclose(x, y, atol=1e-5)


def test_points_decode_to_pictures(gmm):
    s = Sampler(gmm)
    g = s.txt2img(["red", "blue"], [0, 1], 3.0, steps=10, progress=False)
    assert g.images.shape == (2, 32, 32, 3) and g.images.min() == 0.0 and g.images.max() == 1.0


def test_cfg_does_not_sample_the_tilted_target(gmm):
    """Bradley & Nakkiran 2024 ("Classifier-free guidance is a predictor-corrector"): at w > 1 CFG's samples
    are not the tilted target p(x|c)^w p(x)^(1-w), although its combined score is that target's score at
    t = 0. At w = 1 the same measurement is at the noise floor, so the gap is CFG's, not the sampler's."""
    from stablefused.truth import tilted_samples

    s, n = Sampler(gmm), 1500
    floor = sliced_w2(exact_samples(DEFAULT_COMPONENTS, ["red"], n, np.random.default_rng(1)),
                      exact_samples(DEFAULT_COMPONENTS, ["red"], n, np.random.default_rng(2)))
    for w, ok in ((1.0, True), (3.0, False)):
        x = s.txt2img(["red"] * n, list(range(n)), w, steps=100, progress=False).latents.reshape(n, 2).double().numpy()
        d = sliced_w2(x, tilted_samples(DEFAULT_COMPONENTS, "red", w, n, np.random.default_rng(3)))
        assert (d < 2.5 * floor) if ok else (d > 5 * floor), (w, d, floor)


def test_guidance_truth_task_writes_its_table_and_plots(tmp_path):
    from conftest import compose_cfg
    from stablefused.app import run

    cfg = compose_cfg("experiment=guidance_truth", "model=gmm", "points=100", "steps=8", "guidance_scales=[1,3]",
                      "prompts=[red]", "guidance=schedules", "guidance.grid=[{rule: cfg},{rule: apg}]")
    first = run(cfg, tmp_path)
    rows = [r for r in first.manifest.records() if r["type"] == "truth"]
    assert [(r["variant"], r["guidance_scale"]) for r in rows] == [("cfg", 1.0), ("cfg", 3.0), ("apg", 1.0), ("apg", 3.0)]
    assert all(r["w2_floor"] > 0 and r["points"] == 100 for r in rows)
    assert rows[0]["rows_per_point"] == 8 and rows[1]["rows_per_point"] == 16  # w = 1 skips the unconditional pass
    assert rows == json.loads((tmp_path / "truth.json").read_text())
    for name in ("truth.png", "truth_w2.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
    # a rerun keeps the finished cells (their points from disk) and computes the same table
    (tmp_path / "points" / "0003.npy").unlink()
    again = run(cfg, tmp_path)
    assert again.stats["unet_rows"] == 100 * 16  # only the missing cell (apg, w=3) ran again
    assert json.loads((tmp_path / "truth.json").read_text()) == rows


def test_gmm_refuses_image_tasks_before_loading():
    from conftest import compose_cfg
    from stablefused.config import ConfigError, validate

    with pytest.raises(ConfigError, match="task=img2img: model=gmm has no images"):
        validate(compose_cfg("model=gmm", "task=img2img", "init_image=shapes:a red circle"))
    with pytest.raises(ConfigError, match="task=guidance_truth: needs model=gmm"):
        validate(compose_cfg("task=guidance_truth"))


def test_cfg_zero_star_gains_on_a_gaussian_mixture_flow(gmm):
    """Fan et al. 2025 (CFG-Zero*), their toy example: on a Gaussian-mixture flow, CFG-Zero*'s optimised scale
    keeps guided samples closer to the conditional distribution than plain CFG at the same w."""
    from stablefused.guidance import Guidance

    s, n = Sampler(gmm, gmm.make_scheduler("FlowMatchEulerDiscreteScheduler")), 1500
    ref = exact_samples(DEFAULT_COMPONENTS, ["green"], n, np.random.default_rng(1))
    d = {}
    for rule in ("cfg", "cfg_zero_star"):
        g = Guidance.from_config({"schedule": "constant", "rule": rule})
        x = s.txt2img(["green"] * n, list(range(n)), 3.0, steps=50, guidance=g, progress=False).latents
        d[rule] = sliced_w2(x.reshape(n, 2).double().numpy(), ref)
    assert d["cfg_zero_star"] < 0.6 * d["cfg"], d
