"""Guiders of more than two predictions in the one loop: PAG equals diffusers' StableDiffusionPAGPipeline on
a tiny model loaded from disk; a perturbation changes no other row of its batch; the NFE the loop reports is
what the network evaluated; a third prediction needed only inside a window costs nothing outside it."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPAGPipeline

from stablefused.guidance import Guidance
from stablefused.models import build_tiny_random, save_components
from stablefused.pipeline import Sampler

from conftest import run_loop, saved_sd15_style

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]
SEEDS, STEPS, H, W = [3, 7], 6, 16, 24


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_pag")
    return folder, saved_sd15_style(folder)


def pag(**params):
    return Guidance.from_config({"schedule": "constant", "rule": "pag", "rule_params": params})


@pytest.mark.parametrize("cls,scale,pag_scale", [(DDIMScheduler, 7.5, 3.0), (EulerDiscreteScheduler, 4.0, 1.5)])
def test_pag_equals_diffusers_pag_pipeline(sd15, cls, scale, pag_scale):
    folder, comps = sd15
    pipe = StableDiffusionPAGPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == "leading"  # SD 1.5's config came from disk
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    ref = pipe(PROMPTS, negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS, guidance_scale=scale,
               pag_scale=pag_scale, generator=gens, output_type="np").images
    params = {} if pag_scale == 3.0 else {"scale": pag_scale}  # 3.0 and layers=["mid"] are the pipeline's defaults
    ours = Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        PROMPTS, SEEDS, scale, NEG, steps=STEPS, height=H, width=W, guidance=pag(**params), progress=False).images
    plain = Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        PROMPTS, SEEDS, scale, NEG, steps=STEPS, height=H, width=W, progress=False).images
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(plain - ref).max() > 1e-2  # the perturbation really changed the images


class Counting(torch.nn.Module):
    """The UNet, counting calls and rows, keeping each call's output."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls, self.rows, self.outputs, self.inputs, self.ts = unet, 0, 0, [], [], []
        self.config, self.dtype = unet.config, unet.dtype

    def forward(self, x, t, **kw):
        self.calls += 1
        self.rows += x.shape[0]
        out = self.unet(x, t, **kw)
        self.outputs.append(out[0])
        self.inputs.append(x)
        self.ts.append(t)
        return out


@pytest.fixture(scope="module")
def inputs64():
    s = Sampler(build_tiny_random())
    cond = s.encode(PROMPTS).to(dtype=torch.float64)
    uncond = s.encode(NEG).to(dtype=torch.float64)
    latents, _ = s.initial_latents(SEEDS, 16, 16, steps=4)
    s.c.unet.double()
    return s, cond, uncond, latents.double()


def test_perturbation_changes_no_other_row(inputs64):
    """Every call of a PAG run holds [uncond, cond, perturbed]; its uncond and cond rows equal, bit for bit,
    the same inputs evaluated as a plain CFG batch (no perturbation installed), and the perturbed rows differ."""
    s, cond, uncond, latents = inputs64
    net = Counting(s.c.unet)
    run_loop(s, latents, cond, uncond, [7.5, 7.5], 4, network=net, guidance=pag())
    assert net.calls == 4 and net.rows == 4 * 6
    embeds = torch.cat([uncond.embeds, cond.embeds])
    for x, t, out in zip(net.inputs, net.ts, net.outputs):
        assert torch.equal(x[:2], x[2:4]) and torch.equal(x[2:4], x[4:])  # [uncond, cond, perturbed] rows
        plain = s.c.unet(x[:4], t, encoder_hidden_states=embeds, return_dict=False)[0]
        assert torch.equal(out[:4], plain)
        assert (out[4:] - plain[2:]).abs().max() > 1e-3


def test_nfe_counts_what_the_network_evaluated(inputs64):
    """Scales 1 (no uncond) and 0 (PAG still needs cond) and a PAG window: the loop's unet_rows and
    model_calls equal the calls and rows the network saw."""
    s, cond, uncond, latents = inputs64
    net = Counting(s.c.unet)
    _, ctx = run_loop(s, latents, cond, uncond, [1.0, 0.0], 5, network=net, guidance=pag(start=0.0, stop=0.6))
    # window int(0)=0 < i < int(3)=3: i = 1, 2 perturbed; w=1 row needs no uncond, w=0 row needs cond for PAG
    assert net.calls == ctx.stats["model_calls"] == 5
    assert net.rows == ctx.stats["unet_rows"]
    # outside: [u of the w=0 row, c of the w=1 row]; inside: [u(w=0), c, c, perturbed, perturbed]
    assert [o.shape[0] for o in net.outputs] == [2, 5, 5, 2, 2]


def test_third_prediction_outside_its_window_costs_what_cfg_costs(inputs64):
    s, cond, uncond, latents = inputs64
    a, b = Counting(s.c.unet), Counting(s.c.unet)
    out_cfg, _ = run_loop(s, latents, cond, uncond, [7.5, 3.0], 4, network=a)
    out_pag, _ = run_loop(s, latents, cond, uncond, [7.5, 3.0], 4, network=b, guidance=pag(start=0.9, stop=1.0))
    assert a.rows == b.rows == 16 and torch.equal(out_cfg, out_pag)  # window empty for 4 steps: plain CFG


@pytest.fixture(scope="module")
def weak_folder(tmp_path_factory):
    """A second tiny model (other random weights) saved to disk: the autoguidance weak model."""
    folder = tmp_path_factory.mktemp("weak")
    save_components(build_tiny_random(seed=1), folder)
    return folder


def test_every_guider_runs_and_counts_its_network_rows(inputs64, weak_folder):
    """Every guider on the tiny model at scales 0, 1 and 4: finite latents, and the rows/calls the loop
    reports equal what the (wrapped) network evaluated, summed over the main and the weak model."""
    from dataclasses import replace

    from stablefused import registry
    from stablefused.sampling import Request, denoise

    s, cond, uncond, latents = inputs64
    negative = s.encode(["green", "green"]).to(dtype=torch.float64)
    params = {"autoguidance": {"weak_model": str(weak_folder)}, "cfgpp": {}}
    for name in registry.list_names("guidance_rule"):
        if name == "diffusers_config":  # runs the guider its file names (tests/test_guider_config.py)
            continue
        g = Guidance.from_config({"rule": name, "rule_params": params.get(name, {})})
        net = Counting(s.c.unet)
        weak_rows = []
        if name == "autoguidance":
            g.bind(s.family)
            g.rule.model2.network.double()
            weak = g.rule.model2
            orig = type(weak).__call__
            g.rule.model2 = lambda x, t, c, _w=weak: (weak_rows.append(x.shape[0]), orig(_w, x, t, c))[1]
        family = type(s.family)(replace(s.c, modules={**s.c.modules, "unet": net}))
        s.prepare(3, [0, 1])
        request = Request(latents, cond, uncond, [0.0, 4.0], 3, negative=negative if g.uses_negative else None)
        out, ctx = denoise(family, s.scheduler, request, guidance=g, progress=False)
        assert torch.isfinite(out).all(), name
        assert ctx.stats["unet_rows"] == net.rows + sum(weak_rows), name
        assert ctx.stats["model_calls"] == net.calls + len(weak_rows), name
        expected_weak = 3 * 2 if name == "autoguidance" else 0  # w=0 and w=4 rows both need the weak model
        assert sum(weak_rows) == expected_weak, name
        if g.uses_negative:  # perp-neg: [uncond, cond, negative] rows every step
            assert net.rows == 3 * 6, name


def test_autoguidance_loop_equals_a_hand_written_loop(inputs64, weak_folder):
    """D = D0 + w (D1 - D0) with D0 the weak model loaded from disk, written out with the two UNets."""
    s, cond, uncond, latents = inputs64
    g = Guidance.from_config({"rule": "autoguidance", "rule_params": {"weak_model": str(weak_folder)}})
    g.bind(s.family)
    weak_unet = g.rule.model2.network.double()
    out, ctx = run_loop(s, latents, cond, uncond, [2.5, -1.0], 4, guidance=g)
    s.prepare(4, [0, 1])
    x, w = latents, torch.tensor([2.5, -1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    for t in s.scheduler.timesteps:
        strong = s.c.unet(x, t, encoder_hidden_states=cond.embeds).sample
        weak = weak_unet(x, t, encoder_hidden_states=cond.embeds).sample
        x = s.scheduler.step(weak + w * (strong - weak), t, x).prev_sample
    assert (out - x).abs().max() <= 1e-10
    assert ctx.stats["model_calls"] == 8 and ctx.stats["unet_rows"] == 16


def test_stats_telemetry_for_a_pag_run(inputs64):
    """The stats recorder on a PAG run: NFE per sample (3 inside the window, 2 or 1 outside), the perturbation
    term's norm ‖c − p‖, cos(c, u), and the APG split of c − u against c, each recomputed here from the
    predictions the loop handed to hooks."""
    from stablefused import registry
    from stablefused.hooks import BaseHook

    class Keep(BaseHook):
        states = []

        def on_step(self, state):
            self.states.append(state)

    s, cond, uncond, latents = inputs64
    stats, keep = registry.create("recorders", "stats"), Keep()
    with torch.no_grad():
        run_loop(s, latents, cond, uncond, [1.0, 5.0], 4, guidance=pag(start=0.0, stop=0.75), hooks=[stats, keep])
    out, _ = stats.result()
    v = {k: t for k, (t, _) in out.items()}
    assert v["stats.nfe"].tolist() == [[1, 2, 2, 1], [2, 3, 3, 2]]  # window: iterations 1 and 2
    for i, st in enumerate(keep.states):
        c, u = st.eps_cond.flatten(1), st.eps_uncond.flatten(1)
        p = st.predictions["perturbed:identity_attention"].flatten(1)
        for b in range(2):
            extra = v["stats.extra_delta_norm"][b, i]
            if i in (1, 2):
                assert extra == pytest.approx(float((c[b] - p[b]).norm()), rel=1e-5)
            else:
                assert torch.isnan(extra)
        d = c[1] - u[1]
        par = (d @ c[1]) / (c[1] @ c[1]) * c[1]
        assert v["stats.delta_parallel_norm"][1, i] == pytest.approx(float(par.norm()), rel=1e-4)
        assert v["stats.delta_orthogonal_norm"][1, i] == pytest.approx(float((d - par).norm()), rel=1e-4)
        assert v["stats.cos_cond_uncond"][1, i] == pytest.approx(float(c[1] @ u[1] / c[1].norm() / u[1].norm()), rel=1e-5)
        assert torch.isnan(v["stats.cos_cond_uncond"][0, i])  # w = 1: no unconditional pass


def test_autoguidance_by_dropout_repeats_exactly(inputs64):
    """The dropout perturbation's generator restarts with every batch: the same request gives the same latents."""
    s, cond, uncond, latents = inputs64
    g = Guidance.from_config({"rule": "autoguidance", "rule_params": {"perturbation": "attention_dropout",
                                                                      "perturbation_params": {"p": 0.5}}})
    with torch.no_grad():
        a, _ = run_loop(s, latents, cond, uncond, [3.0, 3.0], 3, guidance=g)
        b, _ = run_loop(s, latents, cond, uncond, [3.0, 3.0], 3, guidance=g)
        plain, _ = run_loop(s, latents, cond, uncond, [1.0, 1.0], 3, guidance=g)  # w = 1: the model alone
        cond_only, _ = run_loop(s, latents, cond, uncond, [1.0, 1.0], 3)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert torch.equal(plain, cond_only)


def test_autoguidance_refuses_a_weak_model_of_another_shape(tmp_path):
    folder = tmp_path / "other"
    save_components(build_tiny_random(seed=2, cross_attention_dim=16), folder)
    g = Guidance.from_config({"rule": "autoguidance", "rule_params": {"weak_model": str(folder)}})
    with pytest.raises(ValueError, match="cross_attention_dim is 16, the main model's 32"):
        g.bind(Sampler(build_tiny_random()).family)
