"""Flux.1 through the one loop: parity with FluxPipeline (dev- and schnell-style), FluxImg2ImgPipeline and
FluxInpaintPipeline on tiny random components saved with save_pretrained and loaded back through our loader,
with Flux's scheduler config from disk (dynamic shifting, shift 3.0); guidance 0 and negative against an
independent plain loop; breaking the shift mu or img_ids makes parity fail; and the tasks, recorders,
visualizers and walks run on the tiny model end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from PIL import Image

from stablefused.app import run
from stablefused.config import validate
from stablefused.errors import ConfigError
from stablefused.families import family_of_model_cfg
from stablefused.families import flux as flux_mod
from stablefused.families.flux import DEV_SCHEDULER, Flux, build_tiny_flux
from stablefused.models import load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.img2img import img2img
from stablefused.tasks.inpaint import inpaint
from tests.conftest import compose_cfg

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]
SEEDS = [3, 7]
STEPS = 4
H, W = 16, 24  # not square: packing, ids and unpacking must keep rows and columns apart
TOL = 1e-5


def _model(tmp_path_factory, name, guidance_embeds, **cfg):
    """Tiny Flux components (Flux's dev scheduler config: dynamic shifting, shift 3.0), saved as a diffusers
    folder, loaded back through our loader, and FluxPipeline loaded from the same folder."""
    comps = build_tiny_flux(seed=11, guidance_embeds=guidance_embeds, scheduler=DEV_SCHEDULER)
    folder = save_components(comps, tmp_path_factory.mktemp(name) / "model")
    loaded = load_components({"name": name, "path": str(folder), **cfg}, "cpu", "float32")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["use_dynamic_shifting"]
    assert (sched["base_shift"], sched["max_shift"], sched["shift"]) == (0.5, 1.15, 3.0)
    assert loaded.family_name == "flux" and loaded.scheduler_config["use_dynamic_shifting"]
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return loaded, pipe, folder


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _model(tmp_path_factory, "flux_dev_tiny", True)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _model(tmp_path_factory, "flux_schnell_tiny", False)


def _gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def _ref(pipe, i, w, cls=FluxPipeline, distilled=3.5, **kw):
    """The reference pipeline's packed final latents for prompt/seed i at true_cfg_scale w."""
    p = cls(**pipe.components) if cls is not FluxPipeline else pipe
    p.set_progress_bar_config(disable=True)
    neg = NEG[i] if w != 1 else None
    return p(prompt=PROMPTS[i], negative_prompt=neg, true_cfg_scale=w, guidance_scale=distilled,
             num_inference_steps=STEPS, height=H, width=W, generator=_gen(SEEDS[i]), output_type="latent",
             max_sequence_length=pipe.tokenizer_2.model_max_length, **kw).images


def _diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_txt2img_matches_flux_pipeline_true_cfg(which, request):
    comps, pipe, _ = request.getfixturevalue(which)
    sampler = Sampler(comps)
    scales = [7.5, 3.0]
    ours = sampler.txt2img(PROMPTS, SEEDS, scales, NEG, steps=STEPS, height=H, width=W, progress=False)
    packed = sampler.family.from_spatial(ours.latents)
    for i, w in enumerate(scales):
        assert _diff(packed[i : i + 1], _ref(pipe, i, w)) <= TOL
    # the transformer saw the guidance input only where it has one (dev), and both passes per row
    assert ours.context.stats["unet_rows"] == 2 * len(PROMPTS) * STEPS


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_w1_is_one_pass_with_the_distilled_guidance(which, request):
    comps, pipe, folder = request.getfixturevalue(which)
    for distilled in ((3.5, 5.0) if which == "dev" else (3.5,)):
        c = load_components({"name": comps.name, "path": str(folder), "distilled_guidance": distilled}, "cpu",
                            "float32")
        sampler = Sampler(c)
        ours = sampler.txt2img(PROMPTS, SEEDS, 1.0, NEG, steps=STEPS, height=H, width=W, progress=False)
        assert ours.context.stats["unet_rows"] == len(PROMPTS) * STEPS  # the conditional pass only
        packed = sampler.family.from_spatial(ours.latents)
        for i in range(2):
            assert _diff(packed[i : i + 1], _ref(pipe, i, 1.0, distilled=distilled)) <= TOL
    if which == "dev":  # the setting matters: 5.0 is not 3.5
        assert _diff(_ref(pipe, 0, 1.0, distilled=5.0), _ref(pipe, 0, 1.0, distilled=3.5)) > 1e-3


def _plain_loop(pipe, folder, i, w, distilled):
    """An independent Flux loop with true CFG written out: pipeline encoders and noise, our own steps."""
    n = pipe.tokenizer_2.model_max_length
    pe, pooled, txt_ids = pipe.encode_prompt(PROMPTS[i], prompt_2=None, max_sequence_length=n)
    ne, npooled, _ = pipe.encode_prompt(NEG[i], prompt_2=None, max_sequence_length=n)
    x, img_ids = pipe.prepare_latents(1, 16, H, W, torch.float32, "cpu", _gen(SEEDS[i]))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    c = sched.config
    mu = (x.shape[1] - c.base_image_seq_len) * (c.max_shift - c.base_shift) / (
        c.max_image_seq_len - c.base_image_seq_len) + c.base_shift
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    g = torch.full([1], distilled) if pipe.transformer.config.guidance_embeds else None

    def v(emb, pool, t):
        return pipe.transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=g, pooled_projections=pool,
                                encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    for t in sched.timesteps:
        vu = v(ne, npooled, t)
        pred = vu if w == 0 else vu + w * (v(pe, pooled, t) - vu)
        x = sched.step(pred, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_guidance_zero_and_negative_match_a_plain_loop(which, request):
    comps, pipe, folder = request.getfixturevalue(which)
    sampler = Sampler(comps)
    scales = [0.0, -2.0]
    with torch.no_grad():
        ours = sampler.txt2img(PROMPTS, SEEDS, scales, NEG, steps=STEPS, height=H, width=W, progress=False)
        packed = sampler.family.from_spatial(ours.latents)
        for i, w in enumerate(scales):
            assert _diff(packed[i : i + 1], _plain_loop(pipe, folder, i, w, 3.5)) <= TOL
    # w = 0 needs no conditional pass: 1 row for it, 2 for w = -2, per step
    assert ours.context.stats["unet_rows"] == 3 * STEPS


def _sources():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = np.zeros((H, W, 3), np.uint8)
    b[4:12, 6:18] = (30, 60, 230)
    return [Image.fromarray(a), Image.fromarray(b)]


def test_img2img_matches_flux_img2img_pipeline(dev):
    comps, pipe, _ = dev
    sampler = Sampler(comps)
    sources, scales, strength = _sources(), [7.5, 1.0], 0.6  # 4 x 0.6: Flux runs 3 steps (SD's rule: 2)
    ours = img2img(sampler, sources, PROMPTS, SEEDS, scales, strength, NEG, steps=STEPS, progress=False)
    assert ours.context.stats["model_calls"] == 3
    packed = sampler.family.from_spatial(ours.latents)
    for i, w in enumerate(scales):
        ref = _ref(pipe, i, w, cls=FluxImg2ImgPipeline, image=sources[i], strength=strength)
        assert _diff(packed[i : i + 1], ref) <= TOL


def test_inpaint_matches_flux_inpaint_pipeline(dev):
    comps, pipe, _ = dev
    sampler = Sampler(comps)
    sources = _sources()
    mask = np.zeros((H, W), np.uint8)
    mask[2:10, 8:20] = 255
    masks = [Image.fromarray(mask)] * 2
    for strength in (1.0, 0.75):
        ours = inpaint(sampler, sources, masks, PROMPTS, SEEDS, [7.5, 3.0], strength, NEG, steps=STEPS,
                       progress=False)
        packed = sampler.family.from_spatial(ours.latents)
        for i, w in enumerate([7.5, 3.0]):
            ref = _ref(pipe, i, w, cls=FluxInpaintPipeline, image=sources[i], mask_image=masks[i], strength=strength)
            assert _diff(packed[i : i + 1], ref) <= TOL


def test_decode_matches_the_pipeline_with_the_vae_shift(dev):
    comps, pipe, _ = dev
    assert comps.vae.config.shift_factor == pytest.approx(0.1159)
    fam = Sampler(comps).family
    z = torch.randn(1, 16, H // 2, W // 2, generator=_gen(0))
    with torch.no_grad():
        ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False)[0]
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(fam.decode(z) - ref).max() <= TOL
    # pack and unpack are the pipeline's, and inverse
    fam.grid = None
    packed = fam.from_spatial(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 1, 16, H // 2, W // 2))
    assert torch.equal(fam.to_spatial(packed), z)


@pytest.mark.parametrize("break_", ["no shift mu", "no img_ids"])
def test_breaking_flux_conditioning_breaks_parity(dev, monkeypatch, break_):
    comps, pipe, _ = dev
    if break_ == "no shift mu":  # mu = 0: the dynamic shift does nothing
        monkeypatch.setattr(flux_mod, "shift_mu", lambda config, tokens: 0.0)
    else:
        monkeypatch.setattr(Flux, "img_ids", lambda self, x: torch.zeros(x.shape[1], 3, dtype=x.dtype))
    sampler = Sampler(comps)
    ours = sampler.txt2img(PROMPTS[:1], SEEDS[:1], 7.5, NEG[:1], steps=STEPS, height=H, width=W, progress=False)
    assert _diff(sampler.family.from_spatial(ours.latents), _ref(pipe, 0, 7.5)) > 1e-3


def test_sigmas_are_the_edm_view_of_the_flow_times(dev):
    comps, _, _ = dev
    sampler = Sampler(comps)
    sampler.prepare(STEPS, [0], height=H, width=W)
    s = sampler.scheduler.sigmas[:STEPS].tolist()
    sig = sampler.family.sigmas(sampler.scheduler)
    assert s[0] == 1.0 and sig[0] == float("inf")
    assert sig[1:] == pytest.approx([v / (1 - v) for v in s[1:]])
    # the shift is the image's: a larger image shifts the schedule towards noise
    sampler.prepare(STEPS, [0], height=4 * H, width=4 * W)
    assert (sampler.scheduler.sigmas[1:STEPS] > torch.tensor(s[1:])).all()


def test_known_flux_latent_preview_coefficients():
    from types import SimpleNamespace

    from stablefused.families.flux import FLUX_LATENT_RGB, Flux
    from stablefused.preview import known_preview

    class Cfg(dict):
        __getattr__ = dict.__getitem__

    def sampler_with(vae):
        c = SimpleNamespace(vae=vae)
        return SimpleNamespace(c=c, family=Flux(c))

    flux_vae = SimpleNamespace(config=Cfg(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                          block_out_channels=[128, 256, 512, 512]))
    p = known_preview(sampler_with(flux_vae))
    assert len(FLUX_LATENT_RGB) == 16 and p is not None and "flux" in p.source
    assert p(torch.zeros(1, 16, 2, 2)).shape == (1, 2, 2, 3)
    tiny = SimpleNamespace(config=Cfg(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                      block_out_channels=[16, 32]))
    assert known_preview(sampler_with(tiny)) is None  # random weights: fitted instead


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_hooks_change_no_pixel(mode):
    """accelerate's offload hooks (here with the CPU as execution device: the mechanism, not the memory) on
    every module, in the family's order; encode, VAE encode/decode and the loop run through them."""
    from stablefused.models import cpu_offload

    plain = build_tiny_flux(seed=2)
    hooked = build_tiny_flux(seed=2)
    cpu_offload(hooked, mode, torch.device("cpu"))
    assert hasattr(hooked.transformer, "_hf_hook") and hasattr(hooked.vae, "_hf_hook")
    outs = []
    for c in (plain, hooked):
        s = Sampler(c)
        outs.append(img2img(s, _sources()[:1], PROMPTS[:1], SEEDS[:1], [3.0], 0.75, NEG[:1], steps=STEPS,
                            progress=False).images)
    assert np.abs(outs[0] - outs[1]).max() == 0


def test_linear_preview_of_flux_latents(dev):
    """The linear latent→RGB preview on 16-channel spatial latents (fitted for the random tiny VAE)."""
    from stablefused.preview import make_decoder

    comps, _, _ = dev
    sampler = Sampler(comps)
    out = sampler.txt2img(PROMPTS, SEEDS, 3.0, NEG, steps=STEPS, height=H, width=W, progress=False)
    preview = make_decoder(sampler, "linear", fit_latents=out.latents)(out.latents)
    assert preview.shape == (2, H // 2, W // 2, 3) and np.isfinite(preview).all()
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(out.images).permute(0, 3, 1, 2), 2)
    fitted = torch.from_numpy(preview).permute(0, 3, 1, 2)
    assert float((pooled - fitted).abs().mean()) < float((pooled - pooled.mean()).abs().mean())  # it explains


# ------------------------------------------------------------------------------ the app on the tiny model
FLUX = ["model=tiny_flux", "steps=3", "seeds=[0]", "prompts=[a red circle]"]


def _images_decode(run_dir, n):
    records = [json.loads(x) for x in (Path(run_dir) / "manifest.jsonl").read_text().splitlines()]
    paths = [r["path"] for r in records if r.get("type") in ("image", "frame")
             and r["path"].startswith(("images/", "frames/"))]
    assert len(paths) == n
    for p in paths:
        with Image.open(Path(run_dir) / p) as im:
            assert im.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))  # decodes, not black
    return paths


def test_txt2img_with_guidance_rules_recorders_and_visualizers(tmp_path):
    cfg = compose_cfg(*FLUX, "guidance_scales=[0,1,-2,7.5]", "recorders=[x0,stats,noise,latents]",
                      "visualizers=[step_strip,stats_plot,denoise_video]", "guidance=cutoff")
    r = run(cfg, tmp_path / "run")
    _images_decode(tmp_path / "run", 4)
    assert (tmp_path / "run" / "step_strip_x0.png").is_file() and (tmp_path / "run" / "stats_plot.png").is_file()
    from safetensors.torch import load_file

    x0 = load_file(tmp_path / "run" / "records.safetensors")
    spatial = [v for k, v in x0.items() if k.startswith("x0")]
    assert spatial and all(v.shape[-3:] == (16, 8, 8) for v in spatial)  # spatial layout, not packed tokens
    assert r.stats["unet_rows"] < 2 * 4 * 3  # half-batch skipping at 0 and 1


def test_guidance_grid_of_rules_runs_on_flux(tmp_path):
    cfg = compose_cfg(*FLUX, "task=guidance_grid", "guidance=rules", "guidance_scales=[3]")
    run(cfg, tmp_path / "run")
    _images_decode(tmp_path / "run", len(cfg.guidance.grid))


def test_every_guidance_schedule_and_rule_plugin_on_flux(dev):
    from stablefused.guidance import Guidance
    from stablefused.registry import ParamError, discover, list_names

    discover()
    comps, _, _ = dev
    sampler = Sampler(comps)
    plain = sampler.txt2img(PROMPTS[:1], SEEDS[:1], 3.0, NEG[:1], steps=STEPS, height=H, width=W, progress=False)
    names = [("guidance_schedule", n) for n in list_names("guidance_schedule")]
    names += [("guidance_rule", n) for n in list_names("guidance_rule")]
    assert len(names) >= 8
    for kind, name in names:
        try:
            g = Guidance.from_config({"schedule": name} if kind == "guidance_schedule" else {"rule": name})
        except ParamError:  # a guider that needs settings (autoguidance's weak model, a diffusers config file)
            continue
        if "flux" not in (getattr(g.rule, "families", None) or ["flux"]):  # SAG: UNets only, in one line
            with pytest.raises(ValueError, match=f"^guidance.rule={name}: defined for model families .* not flux$"):
                sampler.txt2img(PROMPTS[:1], SEEDS[:1], 3.0, NEG[:1], steps=STEPS, height=H, width=W, guidance=g)
            continue
        out = sampler.txt2img(PROMPTS[:1], SEEDS[:1], 3.0, NEG[:1], steps=STEPS, height=H, width=W, progress=False,
                              guidance=g)
        assert np.isfinite(out.images).all() and out.latents.shape == (1, 16, H // 2, W // 2)
        # each does something on Flux (slg's default window, 1-20 % of the steps, holds none of these few)
        if name not in ("constant", "cfg", "slg"):
            assert _diff(out.latents, plain.latents) > 1e-6, f"{kind} {name} changed nothing"


def test_img2img_inpaint_and_walk_run_on_flux(tmp_path):
    cfg = compose_cfg(*FLUX, "task=img2img", "init_image=shapes:a large red circle on a black background",
                      "strengths=[0.7]", "guidance_scales=[3]", "recorders=[x0]", "height=16", "width=16")
    run(cfg, tmp_path / "i2i")
    _images_decode(tmp_path / "i2i", 1)
    _sources()[1].save(tmp_path / "src.png")
    cfg = compose_cfg(*FLUX, "task=inpaint", f"init_image={tmp_path / 'src.png'}", "mask=[rect:4,2,16,12]",
                      "strengths=[1.0]", "guidance_scales=[3]", "recorders=[x0]")
    run(cfg, tmp_path / "inp")
    _images_decode(tmp_path / "inp", 1)
    cfg = compose_cfg("model=tiny_flux", "task=walk", "steps=3", "segment_frames=2", "prompts=[a red circle,a blue square]",
                      "seeds=[1,2]", "walker=interpolate", "recorders=[x0]", "guidance_scales=[3]")
    run(cfg, tmp_path / "walk")
    _images_decode(tmp_path / "walk", 3)
    assert (tmp_path / "walk" / "walk.mp4").stat().st_size > 0


def test_flux_says_what_it_cannot_do_before_loading(tmp_path):
    assert family_of_model_cfg(compose_cfg(*FLUX).model) == "flux"
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*FLUX, "recorders=[attention]", "scheduler=euler", "model.distilled_guidance=abc",
                             "model.offload=gpu"))
    msg = str(e.value)
    assert "recorders.attention: Flux has joint" in msg and "scheduler=euler" in msg
    assert "model.distilled_guidance='abc'" in msg and "model.offload='gpu'" in msg


@pytest.mark.parametrize("model", ["flux_dev", "flux_schnell"])
def test_hub_flux_offline_fails_fast_in_one_line(model):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(f"model={model}"))
    assert str(e.value).count("\n") == 0 and "black-forest-labs/FLUX.1-" in str(e.value)
    assert "not downloaded and the hub is offline" in str(e.value)
