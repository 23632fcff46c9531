"""Step recorders: shapes and steps per scheduler (incl. 2nd order), options, no pixel changed, attention maps,
records file round trip, linear previews, experiment composition."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


import pytest
import torch
from hydra import compose, initialize_config_dir

from stablefused import records, registry
from stablefused.paths import config_dir
from stablefused.pipeline import Sampler

PROMPTS = ["a red circle", "a blue square on black"]


@pytest.fixture(scope="module")
def comps():
    from stablefused.models import build_tiny_random

    return build_tiny_random()




def cfg_of(*overrides):
    base = ["model=tiny_random", "logger=none", "progress=false"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


def sampler(comps, cls=None, **overrides):
    return Sampler(comps, comps.make_scheduler(cls, **overrides))


def make(name, **params):
    return registry.create("recorders", name, **params)


def generate(comps, hooks=(), steps=5, cls=None, prompts=PROMPTS, seeds=(0, 1), scales=7.5, **sched):
    return sampler(comps, cls, **sched).txt2img(list(prompts), list(seeds), scales, steps=steps, hooks=hooks,
                                                progress=False)


def tensors(rec):
    out, info = rec.result()
    return {k: v for k, (v, _) in out.items()}, info


@pytest.mark.parametrize("cls, calls_per_step", [
    ("DDIMScheduler", 1), ("EulerDiscreteScheduler", 1), ("DPMSolverMultistepScheduler", 1),
    ("HeunDiscreteScheduler", 2), ("KDPM2DiscreteScheduler", 2),
])
def test_shapes_and_steps_per_scheduler(comps, cls, calls_per_step):
    steps = 4
    lat, x0, noise = (make(n, dtype="float32") for n in ("latents", "x0", "noise"))
    calls = make("x0", dtype="float32", per="call")
    gen = generate(comps, [lat, x0, noise, calls], steps=steps, cls=cls)
    t_lat, info = tensors(lat)
    assert info["steps"] == list(range(steps))
    for rec, names in ((lat, ("x_t", "x_prev")), (x0, ("x0",)), (noise, ("eps_cond", "eps_uncond", "eps_guided"))):
        got, _ = tensors(rec)
        assert set(got) == set(names)
        for v in got.values():
            assert v.shape == (2, steps, 4, 8, 8) and v.device.type == "cpu" and v.dtype == torch.float32
    # one entry per scheduler step; x_t of a step is x_prev of the step before; the last x_prev is the result
    assert torch.equal(t_lat["x_prev"][:, -1], gen.latents)
    assert torch.equal(t_lat["x_t"][:, 1:], t_lat["x_prev"][:, :-1])
    assert torch.equal(t_lat["x_t"][:, 0], gen.context.latents)
    # per=call keeps every UNet call: 2nd-order schedulers make 2 per step except the last
    n_calls = gen.context.stats["model_calls"]
    assert n_calls == (2 * steps - 1 if calls_per_step == 2 else steps)
    assert tensors(calls)[0]["x0"].shape[1] == n_calls
    # per=step x̂0 is the one of each step's first (predictor) call
    first_calls = [0] + [k for k in range(1, n_calls)] if calls_per_step == 1 else list(range(0, n_calls, 2))
    assert torch.equal(tensors(x0)[0]["x0"], tensors(calls)[0]["x0"][:, first_calls])
    assert info["t"] == sorted(info["t"], reverse=True) and info["sigma"][0] > info["sigma"][-1]


def test_ddim_last_x0_is_the_final_latent(comps):
    x0 = make("x0", dtype="float32")
    gen = generate(comps, [x0], steps=5, cls="DDIMScheduler", set_alpha_to_one=True)
    assert torch.equal(tensors(x0)[0]["x0"][:, -1], gen.latents)


def test_recording_changes_no_pixel(comps):
    plain = generate(comps, steps=4, cls="EulerAncestralDiscreteScheduler", scales=[7.5, 0.0])
    hooks = [make("latents"), make("x0"), make("noise"), make("stats"), make("attention")]
    recorded = generate(comps, hooks, steps=4, cls="EulerAncestralDiscreteScheduler", scales=[7.5, 0.0])
    assert torch.equal(plain.latents, recorded.latents)
    assert (plain.images == recorded.images).all()


def test_every_samples_dtype_options(comps):
    lat = make("latents", every=3, samples=[1], dtype="float16")
    stats = make("stats", every=3)
    generate(comps, [lat, stats], steps=8)
    got, info = tensors(lat)
    assert info["steps"] == [0, 3, 6, 7]  # every 3rd and always the last
    assert info["samples"] == [1]
    assert got["x_t"].shape == (1, 4, 4, 8, 8) and got["x_t"].dtype == torch.float16
    assert tensors(stats)[1]["steps"] == [0, 3, 6, 7]
    with pytest.raises(registry.PluginError, match="every"):
        make("x0", every=0)
    with pytest.raises(registry.PluginError, match="dtype"):
        make("x0", dtype="int8")


def test_stats_values(comps):
    noise, x0, stats = make("noise", dtype="float32"), make("x0", dtype="float32"), make("stats")
    generate(comps, [noise, x0, stats], steps=4, scales=[7.5, 1.0])
    n, s = tensors(noise)[0], tensors(stats)[0]
    delta = (n["eps_cond"] - n["eps_uncond"]).flatten(2).norm(dim=2)
    assert torch.allclose(s["stats.guidance_delta_norm"][0], delta[0], atol=1e-5)
    assert torch.isnan(s["stats.guidance_delta_norm"][1]).all()  # guidance 1: the unconditional pass was skipped
    assert torch.equal(s["stats.guidance_scale"], torch.tensor([[7.5] * 4, [1.0] * 4]))
    x = tensors(x0)[0]["x0"]
    change = (x[:, 1:] - x[:, :-1]).flatten(2).norm(dim=2)
    assert torch.isnan(s["stats.x0_change"][:, 0]).all()
    assert torch.allclose(s["stats.x0_change"][:, 1:], change, atol=1e-4)


def test_attention_maps_normalised_restored_and_prompt_dependent(comps):
    before = dict(comps.unet.attn_processors)
    att = make("attention")
    generate(comps, [att], steps=3, prompts=["a red circle", "a blue circle"])
    after = comps.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # the default processors are back
    maps = tensors(att)[0]["attention"]
    assert maps.shape == (2, comps.tokenizer.model_max_length, 8, 8)
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 8, 8), atol=1e-4)
    assert tensors(att)[1]["layers"] and len(tensors(att)[1]["layers"]) == 4  # every cross-attention layer
    # same noise (seed 0 for both), one word different: the maps differ
    att2 = make("attention", layers=["up_blocks"], steps=[0, 2])
    generate(comps, [att2], steps=3, prompts=["a red circle", "a blue circle"], seeds=(0, 0))
    m = tensors(att2)[0]["attention"]
    assert tensors(att2)[1]["layers"] == [k for k in tensors(att2)[1]["layers"] if "up_blocks" in k]
    assert not torch.allclose(m[0], m[1], atol=1e-4)
    with pytest.raises(registry.PluginError, match="matches no cross-attention layer"):
        generate(comps, [make("attention", layers=["nowhere"])], steps=1)
    assert all(comps.unet.attn_processors[k] is before[k] for k in before)


def test_records_file_round_trip_several_batches(tmp_path):
    from stablefused.app import run

    cfg = cfg_of("recorders=[latents,x0,stats]", "steps=3", "batch_size=3", "guidance_scales=[0,7.5]",
                 "recorders.x0.samples=[0,5]")
    r = run(cfg, tmp_path)
    rec = records.load(tmp_path)
    # 2 prompts x 2 seeds x 2 scales = 8 samples in batches of 3, 3, 2
    assert rec["x_t"].shape == (8, 3, 4, 8, 8) and rec["x_t"].dtype == torch.float16
    assert rec["x0"].shape[0] == 2 and [m["index"] for m in rec.samples("x0")] == [0, 5]
    assert [m["index"] for m in rec.samples("x_t")] == list(range(8))
    assert all(rec.samples("x_t")[i]["prompt"] == r.records[i]["prompt"] for i in range(8))
    assert rec.stats["latent_std"].shape == (8, 3)
    assert rec.steps("x_t") == [0, 1, 2] and len(rec.t("x_t")) == 3
    # each sample's trajectory is its own, whatever batch it ran in
    assert torch.equal(rec["x0"][1], rec["x0"][rec.position("x0", 5)])
    listed = [m["path"] for m in r.manifest.records() if m["type"] == "file"]
    assert listed.count("records.safetensors") == 1 and listed.count("records.json") == 1


def test_visualizer_requirements_one_line():
    cfg = cfg_of("visualizers=[denoise_video]", "recorders=[stats]")
    with pytest.raises(registry.PluginError) as e:
        records.check_requirements(cfg)
    assert str(e.value).startswith("visualizers.denoise_video needs recorders=[latents,x0]")
    records.check_requirements(cfg_of("visualizers=[denoise_video]", "recorders=[latents,x0]"))
    records.check_requirements(cfg_of("visualizers=[denoise_video]", "recorders=[x0]",
                                      "visualizers.denoise_video.panels=[x0]"))


def test_experiments_compose():
    cfg = cfg_of("experiment=denoise_video")
    assert list(cfg.recorders) == ["latents", "x0", "stats"]
    assert list(cfg.visualizers) == ["denoise_video", "step_strip", "stats_plot"]
    assert cfg.visualizers.denoise_video.layout == "square" and len(cfg.prompts) == 4
    records.check_requirements(cfg)
    neg = cfg_of("experiment=negative_guidance")
    assert "denoise_video" in neg.visualizers and neg.visualizers.denoise_video.layout == "grid"
    records.check_requirements(neg)


def test_linear_preview(comps):
    from stablefused.preview import SD_LATENT_RGB, LinearPreview, fit_size, is_sd_vae, make_decoder

    assert fit_size((512, 768), 256) == (171, 256) and fit_size((16, 16), 256) == (16, 16)

    s = sampler(comps)
    assert SD_LATENT_RGB.shape == (4, 3) and not is_sd_vae(comps.vae)
    sd = LinearPreview.sd()(torch.zeros(1, 4, 2, 2))
    assert sd.shape == (1, 2, 2, 3) and (sd == 0.5).all()
    gen = generate(comps, steps=3)
    fit = LinearPreview.fit(s, gen.latents)
    assert fit.weight.shape == (4, 3) and fit.bias.shape == (3,) and fit(gen.latents).shape == (2, 8, 8, 3)

    # a decoder that *is* linear per pixel (then upsampled x2): least squares recovers its coefficients
    w, b = torch.randn(4, 3) * 0.1, torch.tensor([0.5, 0.4, 0.6])

    class LinearVAE:
        c = s.c

        def decode(self, lat, batch_size=None):
            rgb = torch.einsum("nchw,ck->nhwk", lat.float(), w) + b
            return rgb.repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()

    fitted = LinearPreview.fit(LinearVAE(), gen.latents)
    assert torch.allclose(fitted.weight, w, atol=1e-4) and torch.allclose(fitted.bias, b, atol=1e-4)
    assert make_decoder(s, "vae")(gen.latents).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="decode="):
        make_decoder(s, "taesd")
