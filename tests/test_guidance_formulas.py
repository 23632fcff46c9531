"""Each guidance rule and schedule against its paper's equation, on small hand-made tensors (no model)."""

import math

import pytest
import torch

from stablefused import registry
from stablefused.hooks import StepInfo


def info(index=0, n=4, sigma=1.0):
    # model_input broadcasts against any prediction: rules working in x̂0 space (apg) can convert
    return StepInfo(index, n, torch.tensor(999 - index), sigma, 14.6, 0.03, model_input=torch.full((1,), 0.3))


def t(*values):
    """One sample as a (1, 1, 2, 2) prediction."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


def rule(name, **params):
    return registry.create("guidance_rule", name, **params)


def sched(name, **params):
    return registry.create("guidance_schedule", name, **params)


W = torch.tensor([3.0])


# ---- cfg (Ho & Salimans 2022): u + w (c - u)

def test_cfg_equation():
    c, u = t(1, 2, 3, 4), t(0, 1, 0, 1)
    assert torch.allclose(rule("cfg")(c, u, W, info()), t(3, 4, 9, 10))


# ---- rescaled_cfg (Lin et al. 2023, §3.4)

def test_rescaled_cfg_hand_example():
    # u = 0: x_cfg = w c, std(x_cfg) = w std(c), so x_rescaled = c and x_final = phi c + (1 - phi) w c.
    c, u = t(1, -1, 1, -1), t(0, 0, 0, 0)
    out = rule("rescaled_cfg", phi=0.5)(c, u, W, info())
    assert torch.allclose(out, 0.5 * c + 0.5 * 3 * c)  # = 2 c


def test_rescaled_cfg_matches_paper_per_sample():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    w = torch.tensor([7.5, -1.0, 2.0])
    out = rule("rescaled_cfg", phi=0.7)(c, u, w, info())
    for b in range(3):  # the paper's equations, one sample at a time
        x_cfg = u[b] + w[b] * (c[b] - u[b])
        x_res = x_cfg * c[b].std() / x_cfg.std()
        assert torch.allclose(out[b], 0.7 * x_res + 0.3 * x_cfg, atol=1e-6)
    assert torch.allclose(rule("rescaled_cfg", phi=0.0)(c, u, w, info()), rule("cfg")(c, u, w, info()))


# ---- apg (Sadat et al. 2024)

def test_apg_projection_hand_example():
    # D = c - u = (1, -1, 0, 0); parallel to c = (1, 0, 0, 0) is (1, 0, 0, 0), orthogonal (0, -1, 0, 0).
    c, u = t(1, 0, 0, 0), t(0, 1, 0, 0)
    out = rule("apg", space="prediction", eta=0.5)(c, u, W, info())
    # c + (w - 1)(D_perp + eta D_par) = (1,0,0,0) + 2 ((0,-1,0,0) + (0.5,0,0,0))
    assert torch.allclose(out, t(2, -2, 0, 0))
    assert torch.allclose(rule("apg", space="prediction", eta=0.0)(c, u, W, info()), t(1, -2, 0, 0))


def test_apg_norm_threshold():
    c, u = t(1, 0, 0, 0), t(0, 1, 0, 0)  # ||D|| = sqrt(2)
    out = rule("apg", space="prediction", eta=1.0, r=0.5)(c, u, W, info())
    d = t(1, -1, 0, 0) * (0.5 / math.sqrt(2))
    assert torch.allclose(out, c + 2 * d)
    # below the threshold nothing is rescaled
    assert torch.allclose(rule("apg", space="prediction", eta=1.0, r=10.0)(c, u, W, info()), rule("cfg")(c, u, W, info()))


def test_apg_momentum_per_sample_and_reset():
    apg = rule("apg", space="prediction", eta=1.0, momentum=-0.5)
    c1, u1 = torch.cat([t(1, 0, 0, 0), t(0, 0, 2, 0)]), torch.cat([t(0, 1, 0, 0), t(0, 0, 0, 0)])
    c2, u2 = torch.cat([t(2, 0, 0, 0), t(0, 0, 1, 1)]), torch.cat([t(0, 0, 0, 0), t(0, 0, 0, 1)])
    w = torch.tensor([3.0, 2.0])
    apg(c1, u1, w, info(0))
    out = apg(c2, u2, w, info(1))
    d = (c2 - u2) - 0.5 * (c1 - u1)  # D_t + beta D_{t-1}, per sample
    assert torch.allclose(out, c2 + (w.view(-1, 1, 1, 1) - 1) * d)  # eta = 1: no projection effect
    apg.reset()  # a new run starts without momentum
    assert torch.allclose(apg(c2, u2, w, info(0)), rule("cfg")(c2, u2, w, info(0)))


def test_apg_eta1_is_cfg():
    g = torch.Generator().manual_seed(1)
    c, u = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    w = torch.tensor([7.5, -2.0])
    assert torch.allclose(rule("apg", space="prediction", eta=1.0)(c, u, w, info()), rule("cfg")(c, u, w, info()), atol=1e-5)



@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_apg_x0_space_is_the_papers_equation_on_denoised_predictions(prediction_type):
    """Paper (Sadat et al. 2024, Alg. 1): the update is computed on D(x) = x̂0, then mapped back."""
    g = torch.Generator().manual_seed(2)
    c, u, x_in = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    w = torch.tensor([7.5, 3.0])
    st = StepInfo(1, 4, torch.tensor(500), 0.8, 14.6, 0.03, model_input=x_in, prediction_type=prediction_type)
    out = rule("apg", eta=0.25, r=2.0)(c, u, w, st)
    dc, du = st.to_x0(c), st.to_x0(u)
    expected_x0 = rule("apg", space="prediction", eta=0.25, r=2.0)(dc, du, w, info())
    assert torch.allclose(st.to_x0(out), expected_x0, atol=1e-5)
    # and it is not the same as applying the equations to the raw predictions
    assert not torch.allclose(out, rule("apg", space="prediction", eta=0.25, r=2.0)(c, u, w, info()), atol=1e-3)

# ---- cfg_zero_star (Fan et al. 2025)

def test_cfg_zero_star_hand_example():
    c, u = t(1, 1, 0, 0), t(2, 0, 0, 0)  # s* = <c,u>/||u||^2 = 2/4 = 0.5, s* u = (1,0,0,0)
    out = rule("cfg_zero_star")(c, u, W, info())
    assert torch.allclose(out, t(1, 3, 0, 0))  # s* u + w (c - s* u)


def test_cfg_zero_star_zero_init():
    c, u = t(1, 1, 0, 0), t(2, 0, 0, 0)
    r = rule("cfg_zero_star", zero_steps=2)
    assert torch.equal(r(c, u, W, info(0)), torch.zeros_like(c))
    assert torch.equal(r(c, u, W, info(1)), torch.zeros_like(c))
    assert torch.allclose(r(c, u, W, info(2)), t(1, 3, 0, 0))


# ---- passes: a rule may only skip a pass where its output does not depend on it

@pytest.mark.parametrize("name,params", [
    ("cfg", {}), ("rescaled_cfg", {}), ("rescaled_cfg", {"phi": 0.0}), ("apg", {}), ("apg", {"eta": 1.0}),
    ("apg", {"momentum": -0.5}), ("apg", {"r": 1.0}), ("cfg_zero_star", {}),
])
def test_passes_promise(name, params):
    g = torch.Generator().manual_seed(2)
    c, u = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    w = torch.tensor([0.0, 1.0, 7.5, -3.0])
    r = rule(name, **params)
    need_c, need_u = r.passes(w)
    full = r(c, u, w, info())
    r.reset()
    c2, u2 = c.clone(), u.clone()
    u2[~need_u], c2[~need_c] = c[~need_u], u[~need_c]  # what the loop fills in
    assert torch.allclose(r(c2, u2, w, info()), full, atol=1e-5)
    assert not need_u[1] or params.get("momentum")  # w = 1 skips the unconditional pass without momentum


# ---- schedules: w = 1 + (b - 1) f

B = torch.tensor([7.5, 0.0, -2.0, 1.0])


def test_constant():
    assert torch.equal(sched("constant")(B, info(2)), B)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_linear_cosine_endpoints_and_mean(name):
    s = sched(name, start=0.0, end=2.0)
    n = 9
    ws = torch.stack([s(B, info(i, n)) for i in range(n)])
    assert torch.equal(ws[0], torch.ones(4))  # f = 0: conditional prediction
    assert torch.allclose(ws[-1], 1 + (B - 1) * 2)
    assert torch.allclose(ws.mean(0), B, atol=1e-6)  # same mean strength as constant
    f3 = 2 * 3 / 8 if name == "linear" else 1 - math.cos(math.pi * 3 / 8)  # iteration 3 of 9
    assert torch.allclose(ws[3], 1 + (B - 1) * f3, atol=1e-6)


def test_interval_paper_definition():
    s = sched("interval", sigma_lo=0.28, sigma_hi=5.42)
    assert torch.equal(s(B, info(sigma=10.0)), torch.ones(4))  # above: conditional (w = 1)
    assert torch.equal(s(B, info(sigma=5.42)), B)  # (lo, hi]: closed above
    assert torch.equal(s(B, info(sigma=1.0)), B)
    assert torch.equal(s(B, info(sigma=0.28)), torch.ones(4))  # open below
    with pytest.raises(ValueError):
        sched("interval", sigma_lo=2.0, sigma_hi=1.0)


def test_cutoff_and_warmup():
    cut = sched("cutoff", frac=0.5)
    assert [bool(torch.equal(cut(B, info(i, 4)), B)) for i in range(4)] == [True, True, False, False]
    assert torch.equal(cut(B, info(3, 4)), torch.ones(4))
    warm = sched("warmup", frac=0.5, start=0.0)
    assert torch.equal(warm(B, info(0, 4)), torch.ones(4))
    assert torch.allclose(warm(B, info(1, 4)), 1 + (B - 1) * 0.5)
    assert torch.equal(warm(B, info(2, 4)), B)
