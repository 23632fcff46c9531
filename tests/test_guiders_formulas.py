"""Each guider's combine step equals diffusers' guider `forward` (diffusers.guiders, 0.42) on the same random
predictions, over scales and steps including the perturbed-guidance windows (<= 1e-6); perp-neg and CFG++
against transcriptions of their papers' equations."""

import logging
import math

import pytest
import torch
from diffusers import guiders as dg

from stablefused import registry
from stablefused.guidance import COND, NEGATIVE, UNCOND, Guidance, perturbed
from stablefused.hooks import StepInfo

logging.getLogger("diffusers.guiders").setLevel(logging.ERROR)
N = 10  # steps
SCALES = [0.0, 3.0, 7.5, -2.0]  # w = 1 separately: diffusers' perturbed guiders differ from their pipelines there


def preds(seed, k=3, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def info(i, n=N):
    return StepInfo(i, n, torch.tensor(999 - 100 * i), 5.0 - 0.4 * i, 5.0, 0.4)


def ours(rule, params, p, w, step):
    g = registry.create("guidance_rule", rule, **params)
    ws = torch.full((p[COND].shape[0],), float(w))
    return g.combine(p, ws, info(step)) if hasattr(g, "combine") else g(p[COND], p[UNCOND], ws, info(step))


def theirs(guider, step, *args):
    guider.set_state(step, N, torch.tensor(999 - 100 * step))
    return guider.forward(*args).pred


PERTURBED = [("pag", "identity_attention", dg.PerturbedAttentionGuidance, "perturbed_guidance"),
             ("seg", "blurred_queries", dg.SmoothedEnergyGuidance, "seg_guidance"),
             ("slg", "skip_blocks", dg.SkipLayerGuidance, "skip_layer_guidance")]


@pytest.mark.parametrize("rule,perturbation,cls,prefix", PERTURBED)
@pytest.mark.parametrize("window", [(0.0, 1.0), (0.01, 0.2), (0.3, 0.75)])
@pytest.mark.parametrize("s", [2.8, 0.5])
def test_perturbed_guiders_equal_diffusers(rule, perturbation, cls, prefix, window, s):
    c, u, pt = preds(hash((rule, window, s)) % 1000)
    p = {COND: c, UNCOND: u, perturbed(perturbation): pt}
    scale_key = "perturbed_guidance_scale" if rule == "pag" else f"{prefix}_scale"
    kw = {scale_key: s, f"{prefix}_start": window[0], f"{prefix}_stop": window[1]}
    kw[f"{prefix}_layers" if rule != "seg" else "seg_guidance_layers"] = [0]
    for w in SCALES:
        ref = cls(guidance_scale=w, **kw)
        for step in range(N):
            got = ours(rule, {"scale": s, "start": window[0], "stop": window[1]}, p, w, step)
            assert (got - theirs(ref, step, c, u, pt)).abs().max() <= 1e-6, (w, step)


def test_perturbed_guiders_at_scale_one_follow_the_pag_pipeline():
    """w = 1: c + s (c - p) (the paper and StableDiffusionPAGPipeline without CFG); diffusers' guider class
    gives p + s (c - p) there, which is what its pipeline does not do."""
    c, u, pt = preds(5)
    got = ours("pag", {"scale": 3.0}, {COND: c, UNCOND: c, perturbed("identity_attention"): pt}, 1.0, 4)
    assert torch.allclose(got, c + 3.0 * (c - pt), atol=1e-6)


@pytest.mark.parametrize("momentum,r,eta", [(None, 15.0, 1.0), (-0.5, 15.0, 0.0), (0.3, 0.0, 0.5)])
def test_apg_equals_diffusers(momentum, r, eta):
    """Our apg (the paper's c + (w-1) update) is diffusers' APG with use_original_formulation and scale w - 1."""
    for w in SCALES + [1.0]:
        g = registry.create("guidance_rule", "apg", eta=eta, r=r, momentum=momentum or 0.0, space="prediction")
        ref = dg.AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=momentum,
                                           adaptive_projected_guidance_rescale=r, eta=eta,
                                           use_original_formulation=True)
        for step in range(N):
            c, u = preds(step, 2)
            ref.set_state(step, N, torch.tensor(step))
            if step == 0 and momentum is not None:
                ref.momentum_buffer = dg.adaptive_projected_guidance.MomentumBuffer(momentum)
            got = g(c, u, torch.full((2,), float(w)), info(step))
            assert (got - ref.forward(c, u).pred).abs().max() <= 1e-5 * max(1, abs(w)), (w, step)


@pytest.mark.parametrize("zero_steps", [0, 2])
def test_cfg_zero_star_equals_diffusers(zero_steps):
    for w in SCALES + [1.0]:
        ref = dg.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_steps)
        for step in range(N):
            c, u = preds(step, 2)
            got = ours("cfg_zero_star", {"zero_steps": zero_steps}, {COND: c, UNCOND: u}, w, step)
            assert (got - theirs(ref, step, c, u)).abs().max() <= 1e-6, (w, step)


@pytest.mark.parametrize("rule,params,cls,kw", [
    ("cfg", {}, dg.ClassifierFreeGuidance, {}),
    ("rescaled_cfg", {"phi": 0.7}, dg.ClassifierFreeGuidance, {"guidance_rescale": 0.7}),
    ("tcfg", {}, dg.TangentialClassifierFreeGuidance, {}),
    ("mambo_g", {"alpha": 8.0}, dg.MagnitudeAwareGuidance, {"alpha": 8.0}),
    ("mambo_g", {"alpha": 0.5}, dg.MagnitudeAwareGuidance, {"alpha": 0.5}),
])
def test_two_condition_guiders_equal_diffusers(rule, params, cls, kw):
    # diffusers' MagnitudeAwareGuidance calls torch.norm over 3 dims, which torch refuses for 4-D latents; it
    # runs on packed transformer latents (B, L, D), so it is compared there (ours takes both)
    shape = (2, 16, 64) if rule == "mambo_g" else (2, 4, 8, 8)
    for w in SCALES + [1.0, 10.0]:
        ref = cls(guidance_scale=w, **kw)
        for step in (0, 5, 9):
            c, u = preds(step + 17, 2, shape)
            got = ours(rule, params, {COND: c, UNCOND: u}, w, step)
            assert (got - theirs(ref, step, c, u)).abs().max() <= 1e-6 * max(1, abs(w)), (rule, w, step)


@pytest.mark.parametrize("w,scales,parallel", [(10.0, [10.0, 5.0], None), (4.0, [4.0, 2.5], [0.5, 1.0]),
                                               (-2.0, [-2.0, 0.5], [1.0, 0.3]), (7.0, [7.0, 3.0, 1.5], None)])
def test_fdg_equals_diffusers(w, scales, parallel):
    pytest.importorskip("kornia")
    levels = [(s - 1) / (w - 1) for s in scales]
    ref = dg.FrequencyDecoupledGuidance(guidance_scales=scales, parallel_weights=parallel)
    c, u = preds(int(w * 10) % 97, 2, shape=(2, 4, 16, 16))
    got = ours("fdg", {"levels": levels, "parallel_weights": parallel}, {COND: c, UNCOND: u}, w, 3)
    assert (got - theirs(ref, 3, c, u)).abs().max() <= 1e-6 * abs(w)


def test_fdg_level_with_scale_one_keeps_the_conditional_level():
    """A level whose scale is 1 keeps c_k (diffusers means to, but appends the previous level's c there, a
    stale loop variable, and fails on the shape): with every level at 1, FDG returns c."""
    pytest.importorskip("kornia")
    c, u = preds(4, 2, shape=(2, 4, 16, 16))
    got = ours("fdg", {"levels": [1.0, 0.0]}, {COND: c, UNCOND: u}, 3.0, 0)  # scales [3, 1]
    ref = ours("fdg", {"levels": [1.0, 1e-12]}, {COND: c, UNCOND: u}, 3.0, 0)
    assert (got - ref).abs().max() <= 1e-5
    assert torch.equal(ours("fdg", {}, {COND: c, UNCOND: u}, 1.0, 0), c)


def test_autoguidance_equals_diffusers():
    """diffusers' AutoGuidance forward with its pred_uncond the weak model's prediction."""
    for w in SCALES + [1.0]:
        ref = dg.AutoGuidance(guidance_scale=w, auto_guidance_layers=[0], dropout=0.1)
        for step in (0, 4):
            c, weak = preds(step + 3, 2)
            got = ours("autoguidance", {"perturbation": "attention_dropout"},
                       {COND: c, UNCOND: c, perturbed("attention_dropout"): weak}, w, step)
            assert (got - theirs(ref, step, c, weak)).abs().max() <= 1e-6 * max(1, abs(w))


@pytest.mark.parametrize("neg_scale", [1.0, 0.5, 0.0])
def test_perp_neg_equals_the_papers_equation(neg_scale):
    """Armandpour et al. 2023: eps = e_0 + w (e_c - e_0) - s (e_n - e_0)_perp, the perpendicular part taken
    against (e_c - e_0), written out here sample by sample with plain vector algebra."""
    c, u, n = preds(11, 3)
    for w in SCALES + [1.0]:
        got = ours("perp_neg", {"neg_scale": neg_scale}, {COND: c, UNCOND: u, NEGATIVE: n}, w, 0)
        for b in range(2):
            pos, neg = (c[b] - u[b]).flatten(), (n[b] - u[b]).flatten()
            perp = neg - (neg @ pos) / (pos @ pos) * pos
            want = u[b].flatten() + w * pos - neg_scale * perp
            assert (got[b].flatten() - want).abs().max() <= 1e-5
    # the negative part along the prompt's direction is kept: a negative equal to the prompt changes nothing
    cfg = ours("cfg", {}, {COND: c, UNCOND: u}, 5.0, 0)
    assert torch.allclose(ours("perp_neg", {}, {COND: c, UNCOND: u, NEGATIVE: c}, 5.0, 0), cfg, atol=1e-5)


def _ddim(tmp_path):
    from diffusers import DDIMScheduler

    from tests.test_scheduler_parity import SD15_SCHEDULER

    DDIMScheduler.from_config(SD15_SCHEDULER).save_pretrained(tmp_path)
    return DDIMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_cfgpp_ddim_step_equals_the_papers_algorithm(tmp_path, lam):
    """Chung et al. 2024, Algorithm 1: x0 = (x - sqrt(1-a) e_lam) / sqrt(a); x_prev = sqrt(a') x0 + sqrt(1-a') e_0,
    against our guider's prediction through DDIMScheduler.step, on SD 1.5's scheduler config from disk."""
    sched = _ddim(tmp_path)
    sched.set_timesteps(10)
    sigmas = [math.sqrt((1 - float(sched.alphas_cumprod[int(t)])) / float(sched.alphas_cumprod[int(t)]))
              for t in sched.timesteps]
    a_final = float(sched.final_alpha_cumprod)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    for i, t in enumerate(sched.timesteps):
        c, u = preds(i + 40, 2)
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else math.sqrt((1 - a_final) / a_final)
        step = StepInfo(i, 10, t, sigmas[i], sigmas[0], sigmas[-1], x, "epsilon", nxt)
        g = registry.create("guidance_rule", "cfgpp")
        eps = g(c, u, torch.full((2,), lam), step)
        got = sched.step(eps, t, x).prev_sample
        a = float(sched.alphas_cumprod[int(t)])
        prev = int(t) - 1000 // 10
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else a_final
        e_lam = u + lam * (c - u)
        x0 = (x - math.sqrt(1 - a) * e_lam) / math.sqrt(a)
        want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * u
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), i
        x = want


def test_cfgpp_euler_step_equals_the_papers_algorithm(tmp_path):
    """Euler form: x_next = x0(e_lam) + sigma_next e_0 (k-diffusion's x = x0 + sigma eps), through
    EulerDiscreteScheduler.step."""
    from diffusers import EulerDiscreteScheduler

    from tests.test_scheduler_parity import SD15_SCHEDULER

    EulerDiscreteScheduler.from_config(SD15_SCHEDULER).save_pretrained(tmp_path)
    sched = EulerDiscreteScheduler.from_pretrained(tmp_path)
    sched.set_timesteps(8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * float(sched.init_noise_sigma)
    for i, t in enumerate(sched.timesteps):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        c, u = preds(i + 60, 2)
        model_input = sched.scale_model_input(x, t)
        step = StepInfo(i, 8, t, s, float(sched.sigmas[0]), float(sched.sigmas[-2]), model_input, "epsilon", s_next)
        eps = registry.create("guidance_rule", "cfgpp")(c, u, torch.full((2,), 0.6), step)
        got = sched.step(eps, t, x).prev_sample
        x0 = x - s * (u + 0.6 * (c - u))
        want = x0 + s_next * u
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), i
        x = want


def test_guider_needs_skip_only_what_the_output_does_not_depend_on():
    """For every guider and scale in {0, 1}: filling a prediction the guider said it does not need with
    garbage leaves its output unchanged."""
    c, u, pt = preds(99)
    for name in registry.list_names("guidance_rule"):
        if name == "diffusers_config":
            continue
        params = {"perturbation": "attention_dropout"} if name == "autoguidance" else {}
        g = Guidance.from_config({"rule": name, "rule_params": params}).rule
        for w in (0.0, 1.0, 4.0):
            ws = torch.full((2,), w)
            st = StepInfo(3, N, torch.tensor(500), 2.0, 5.0, 0.4, c.clone(), "epsilon", 1.5)
            full = {COND: c, UNCOND: u, NEGATIVE: pt}
            full.update({perturbed(k): pt for k in getattr(g, "perturbations", {})})
            needs = Guidance(None, g).needs(ws, st)
            full.update({k: pt for k in needs if k not in full})  # e.g. SAG's dependent:sag
            want = Guidance(None, g).combine(full, ws, st)
            junk = {k: torch.where(needs.get(k, torch.zeros(2, dtype=torch.bool)).view(-1, 1, 1, 1), v, 1e3 + v)
                    for k, v in full.items()}
            assert torch.allclose(Guidance(None, g).combine(junk, ws, st), want, atol=1e-4), (name, w)


def test_fdg_on_latents_whose_side_is_not_a_power_of_two():
    """12x12 latents (the 48-px scene models): kornia pads the pyramid to 16x16; the guided prediction comes back
    12x12, equal to the conditional prediction at w = 1."""
    from stablefused.guidance import Guidance

    g = Guidance.from_config({"rule": "fdg"}).rule
    c, u = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 12, 12)
    out = g(c, u, torch.tensor([7.5, 1.0]), None)
    assert out.shape == c.shape and torch.equal(out[1], c[1]) and not torch.allclose(out[0], c[0])
