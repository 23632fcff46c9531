"""diffusers' guider_config.json loads as our guider (same combine as the diffusers object that saved it, same
layers selected) and ours saves in that format (diffusers loads it back to the same settings)."""

import logging

import pytest
import torch
from diffusers import guiders as dg

from stablefused import guider_config, registry
from stablefused.guidance import COND, UNCOND, perturbed
from stablefused.models import build_tiny_random
from stablefused.perturbations import select

from tests.test_guiders_formulas import N, info, preds

logging.getLogger("diffusers").setLevel(logging.ERROR)

SAVED = [
    dg.ClassifierFreeGuidance(guidance_scale=6.0),
    dg.ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7),
    dg.ClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True),
    dg.TangentialClassifierFreeGuidance(guidance_scale=5.0),
    dg.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2),
    dg.AdaptiveProjectedGuidance(guidance_scale=6.0, eta=0.0, adaptive_projected_guidance_rescale=10.0,
                                 use_original_formulation=True),
    dg.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], parallel_weights=[0.5, 1.0]),
    dg.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0, perturbed_guidance_layers=[0, 2]),
    dg.SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_scale=3.0, seg_guidance_layers=[1],
                              seg_guidance_start=0.2, seg_guidance_stop=0.8),
    dg.SkipLayerGuidance(guidance_scale=7.0, skip_layer_guidance_layers=[7, 8]),
]


@pytest.mark.parametrize("ref", SAVED, ids=lambda g: type(g).__name__)
def test_diffusers_guider_config_loads_as_the_same_guider(tmp_path, ref):
    ref.save_pretrained(tmp_path)
    loaded = guider_config.load(tmp_path)
    g = registry.create("guidance_rule", loaded["rule"], **loaded["rule_params"])
    shape = (2, 4, 16, 16)
    for step in range(N):
        c, u, pt = preds(step + 7, 3, shape)
        p = {COND: c, UNCOND: u, **{perturbed(k): pt for k in getattr(g, "perturbations", {})}}
        w = torch.full((2,), float(loaded["scale"]))
        got = g.combine(p, w, info(step))
        ref.set_state(step, N, torch.tensor(step))
        if isinstance(ref, dg.AdaptiveProjectedGuidance) and step == 0:
            ref.momentum_buffer = None
        want = ref.forward(c, u, pt).pred if loaded["rule"] in ("pag", "seg", "slg") else ref.forward(c, u).pred
        assert (got - want).abs().max() <= 1e-5 * max(1.0, abs(loaded["scale"])), step


def test_diffusers_pag_layers_select_the_same_modules(tmp_path):
    """A PAG config naming the UNet's mid-block transformer block selects its self-attention (attn1) only."""
    dg.PerturbedAttentionGuidance(perturbed_guidance_config={"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks"},
                                  perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0).save_pretrained(tmp_path)
    loaded = guider_config.load(tmp_path / "guider_config.json")
    unet = build_tiny_random().unet
    names = [n for n, _ in select(unet, "attention", loaded["rule_params"]["layers"])]
    assert names == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert names == [n for n, _ in select(unet, "attention", ["mid"])]  # = the PAG pipeline's default


@pytest.mark.parametrize("rule,params", [("pag", {"layers": ["mid"], "start": 0.0, "stop": 0.5, "scale": 2.0}),
                                         ("slg", {"layers": ["up_blocks"], "scale": 1.5}),
                                         ("seg", {"layers": ["down"], "start": 0.1, "stop": 0.9, "sigma": 3.0}),
                                         ("apg", {"eta": 0.0, "r": 5.0, "space": "prediction"}),
                                         ("fdg", {"levels": [1.0, 0.5]}), ("mambo_g", {"alpha": 4.0}),
                                         ("rescaled_cfg", {"phi": 0.5}), ("cfg_zero_star", {"zero_steps": 1})])
def test_ours_saves_as_diffusers_and_loads_back(tmp_path, rule, params):
    unet = build_tiny_random().unet
    path = guider_config.save(rule, params, 6.0, tmp_path, network=unet)
    cls = getattr(dg, registry.get("guidance_rule", rule).diffusers_class)
    theirs = cls.from_pretrained(tmp_path)
    back = guider_config.load(path)
    assert back["rule"] == rule and back["scale"] == pytest.approx(6.0)
    ours = registry.create("guidance_rule", rule, **params)
    again = registry.create("guidance_rule", rule, **back["rule_params"])
    if rule in ("pag", "slg", "seg"):
        (p1,), (p2,) = ours.perturbations.values(), again.perturbations.values()
        assert [n for n, _ in p1.modules(unet, "sd")] == [n for n, _ in p2.modules(unet, "sd")]
    shape = (2, 64, 16) if rule == "mambo_g" else (2, 4, 16, 16)  # diffusers' MAMBO-G fails on 4-D latents
    for step in range(N):
        c, u, pt = preds(step, 3, shape)
        p = {COND: c, UNCOND: u, **{perturbed(k): pt for k in getattr(ours, "perturbations", {})}}
        w = torch.full((2,), 6.0)
        assert torch.allclose(ours.combine(p, w, info(step)), again.combine(p, w, info(step)), atol=1e-5)
        theirs.set_state(step, N, torch.tensor(step))
        want = theirs.forward(c, u, pt).pred if rule in ("pag", "seg", "slg") else theirs.forward(c, u).pred
        assert (again.combine(p, w, info(step)) - want).abs().max() <= 1e-5 * 6


def test_settings_without_an_equivalent_are_refused_in_one_line(tmp_path):
    dg.AdaptiveProjectedGuidance(guidance_scale=5.0, start=0.2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"start=0.2.*use_original_formulation=false"):
        guider_config.load(tmp_path)
    with pytest.raises(ValueError, match="every step"):
        guider_config.save("pag", {}, 5.0, tmp_path, network=build_tiny_random().unet)
    with pytest.raises(ValueError, match="window=pipeline counts its window"):  # StableDiffusion3Pipeline's count
        guider_config.save("slg", {"window": "pipeline"}, 5.0, tmp_path, network=build_tiny_random().unet)


def test_cli_runs_a_diffusers_guider_config(tmp_path):
    """guidance.rule=diffusers_config on the tiny model: a saved PAG config runs (its mid-block layers), and a
    bad file is one line at validation."""
    from stablefused.config import validate
    from tests.conftest import compose_cfg

    dg.PerturbedAttentionGuidance(perturbed_guidance_config={"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks"},
                                  perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0).save_pretrained(tmp_path)
    g = registry.create("guidance_rule", "diffusers_config", path=str(tmp_path))
    assert g.rule_name == "pag" and g.file_scale == 7.5 and list(g.perturbations) == ["identity_attention"]
    validate(compose_cfg("guidance.rule=diffusers_config", f"+guidance.rule_params.path={tmp_path}"))
    from stablefused.errors import ConfigError
    with pytest.raises(ConfigError, match="guider_config.json"):
        validate(compose_cfg("guidance.rule=diffusers_config", f"+guidance.rule_params.path={tmp_path / 'none'}"))
