"""SDXL through the one loop: parity with StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline (base and
refiner-style) and StableDiffusionXLInpaintPipeline (4- and 9-channel UNets) on tiny random components saved
with save_pretrained and loaded back through our loader, with SDXL's scheduler config from disk; guidance 0, 1
and negative against a plain loop written here; conditioning broken on purpose (time_ids, pooled embeddings,
zeroed negatives) fails parity; the tasks, guidance plugins, recorders, visualizers and walks on
model=tiny_sdxl."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw

from stablefused.app import run
from stablefused.families.sdxl import SDXL, build_tiny_sdxl
from stablefused.models import load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.img2img import img2img
from stablefused.tasks.inpaint import inpaint
from tests.conftest import compose_cfg

PROMPTS, SEEDS, NEG = ["a red circle", "a blue square on black"], [3, 4], ["green", "a small triangle"]
H, W, STEPS = 16, 24, 5  # not square: time_ids hold (height, width) in that order

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_SCHEDULER_JSON = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def _save_and_load(comps, folder, **model_cfg):
    folder = save_components(comps, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_JSON))
    loaded = load_components({"name": folder.name, "path": str(folder), **model_cfg}, "cpu", "float32")
    assert loaded.family.name == "sdxl" and loaded.scheduler_config["timestep_spacing"] == "leading"
    return loaded


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_models")
    inpainting = build_tiny_sdxl(seed=7)
    torch.manual_seed(8)
    inpainting.unet = UNet2DConditionModel.from_config({**inpainting.unet.config, "in_channels": 9})
    inpainting.info = {"pipeline_class": "StableDiffusionXLInpaintPipeline", "pipeline_config": {}}
    return {"base": _save_and_load(build_tiny_sdxl(seed=3), root / "sdxl"),
            "refiner": _save_and_load(build_tiny_sdxl(seed=5, refiner=True), root / "refiner"),
            "inpainting": _save_and_load(inpainting, root / "inpainting")}


def _pipe(cls, comps, scheduler):
    kw = {k: comps.modules.get(k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    flags = {k: v for k, v in comps.info["pipeline_config"].items()
             if k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")}
    if cls is StableDiffusionXLPipeline:
        flags.pop("requires_aesthetics_score", None)
    pipe = cls(**kw, scheduler=scheduler, add_watermarker=False, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _sources():
    out = []
    for i, colour in enumerate(("red", "blue")):
        im = Image.new("RGB", (W, H), "black" if i else "white")
        ImageDraw.Draw(im).ellipse([3 + 4 * i, 2, 15 + 4 * i, 13], fill=colour)
        out.append(im)
    return out


def _masks():
    out = []
    for box in ([4, 2, 15, 11], [10, 3, 21, 14]):
        m = Image.new("L", (W, H), 0)
        ImageDraw.Draw(m).rectangle(box, fill=255)
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------- parity
def txt2img_error(comps, sched="euler", scale=7.5, negative=None, n=2, **pipe_kw):
    cls = SCHEDULERS[sched]
    ref = _pipe(StableDiffusionXLPipeline, comps, cls.from_config(comps.scheduler_config))(
        PROMPTS[:n], negative_prompt=negative and negative[:n], num_inference_steps=STEPS, guidance_scale=scale,
        height=H, width=W, generator=_gens()[:n], output_type="np", **pipe_kw).images
    ours = Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        PROMPTS[:n], SEEDS[:n], scale, (negative or [""] * n)[:n], steps=STEPS, height=H, width=W,
        progress=False).images
    assert ours.shape == ref.shape == (n, H, W, 3)
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_txt2img_parity(models, sched, scale):
    """Empty negative prompt (zeroed: force_zeros_for_empty_prompt) and real ones."""
    assert txt2img_error(models["base"], sched, scale) <= 1e-5
    assert txt2img_error(models["base"], sched, scale, negative=NEG) <= 1e-5


def test_micro_conditioning_settings_parity(models):
    """model.original_size / crops_coords_top_left / target_size and the negative ones, as pipeline arguments.
    With negative sizes the pipeline lines its time_ids up wrongly for more than one prompt (it repeats
    [neg, pos] per prompt against embeddings laid out [neg, neg, pos, pos]), so that case runs one prompt."""
    sizes = dict(original_size=[64, 40], crops_coords_top_left=[4, 8], target_size=[32, 48])
    negative = dict(negative_original_size=[20, 20], negative_target_size=[24, 16],
                    negative_crops_coords_top_left=[2, 2])
    for settings, n in ((sizes, 2), ({**sizes, **negative}, 1)):
        comps = load_components({"name": "sdxl", "path": models["base"].source, **settings}, "cpu", "float32")
        kw = {k: tuple(v) for k, v in settings.items()}
        assert txt2img_error(comps, "euler", 7.5, NEG, n=n, **kw) <= 1e-5
        assert txt2img_error(comps, "euler", 7.5, NEG, n=n) > 1e-4  # the settings change the image


@pytest.mark.parametrize("model,sched,strength", [("base", "euler", 0.6), ("base", "dpmpp_2m", 1.0),
                                                   ("refiner", "euler", 0.6), ("refiner", "dpmpp_2m", 0.4)])
def test_img2img_parity(models, model, sched, strength):
    """The refiner-style model: second encoder only, aesthetic-score time_ids, negatives encoded (not zeroed)."""
    comps, cls = models[model], SCHEDULERS[sched]
    ref = _pipe(StableDiffusionXLImg2ImgPipeline, comps, cls.from_config(comps.scheduler_config))(
        PROMPTS, image=_sources(), strength=strength, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=_gens(), output_type="np").images
    ours = img2img(Sampler(comps, cls.from_config(comps.scheduler_config)), _sources(), PROMPTS, SEEDS, [7.5, 7.5],
                   strength, "", steps=STEPS, progress=False).images
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("model,cls,strength", [("inpainting", EulerDiscreteScheduler, 1.0),
                                                 ("inpainting", EulerAncestralDiscreteScheduler, 0.6),
                                                 ("base", EulerDiscreteScheduler, 1.0),
                                                 ("base", DPMSolverMultistepScheduler, 0.6)])
def test_inpaint_parity(models, model, cls, strength):
    comps = models[model]
    ref = _pipe(StableDiffusionXLInpaintPipeline, comps, cls.from_config(comps.scheduler_config))(
        PROMPTS, image=_sources(), mask_image=_masks(), height=H, width=W, strength=strength, negative_prompt=NEG,
        num_inference_steps=STEPS, guidance_scale=7.5, generator=_gens(), output_type="np").images
    ours = inpaint(Sampler(comps, cls.from_config(comps.scheduler_config)), _sources(), _masks(), PROMPTS, SEEDS,
                   [7.5, 7.5], strength, NEG, steps=STEPS, progress=False).images
    assert np.abs(ours - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------- a plain loop
@torch.no_grad()
def plain_loop(comps, scale, negative):
    """SDXL sampling written out: the pipeline's encode_prompt, time_ids (h, w, 0, 0, h, w), Euler, and only
    the UNet passes the scale needs (0: unconditional, 1: conditional)."""
    pipe = _pipe(StableDiffusionXLPipeline, comps, EulerDiscreteScheduler.from_config(comps.scheduler_config))
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=negative)
    sched, unet = pipe.scheduler, comps.unet
    sched.set_timesteps(STEPS)
    x = torch.cat([torch.randn((1, 4, H // 2, W // 2), generator=g) for g in _gens()]) * sched.init_noise_sigma
    ids = torch.tensor([[H, W, 0, 0, H, W]] * len(PROMPTS), dtype=torch.float32)

    def eps(x_in, t, e, p):
        return unet(x_in, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p, "time_ids": ids}).sample

    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if scale == 0:
            e = eps(x_in, t, neg, neg_pooled)
        elif scale == 1:
            e = eps(x_in, t, emb, pooled)
        else:
            u, c = eps(x_in, t, neg, neg_pooled), eps(x_in, t, emb, pooled)
            e = u + scale * (c - u)
        x = sched.step(e, t, x).prev_sample
    return x


@pytest.mark.parametrize("scale,negative", [(0.0, None), (1.0, None), (-2.0, NEG), (0.0, NEG)])
def test_guidance_0_1_negative_match_a_plain_loop(models, scale, negative):
    comps = models["base"]
    gen = Sampler(comps, EulerDiscreteScheduler.from_config(comps.scheduler_config)).txt2img(
        PROMPTS, SEEDS, scale, negative or "", steps=STEPS, height=H, width=W, progress=False)
    ref = plain_loop(comps, scale, negative)
    assert (gen.latents - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    rows = gen.context.stats["unet_rows"]
    assert rows == STEPS * len(PROMPTS) * (1 if scale in (0, 1) else 2)  # half-batch skipping at 0 and 1


# ------------------------------------------------------------------------------------------- broken on purpose
def _broken_image_size_ids(self, time_ids, x):
    return torch.zeros_like(time_ids)


def _swapped_pooled(encode):
    def wrapped(self, prompts, negative=False):
        c = encode(self, prompts, negative)
        c.rows["text_embeds"] = c.rows["text_embeds"].flip(0)
        return c
    return wrapped


def _hw_swapped(fill):
    def wrapped(self, time_ids, x):
        return fill(self, time_ids, x.transpose(-1, -2))
    return wrapped


@pytest.mark.parametrize("breakage", ["no_time_ids", "time_ids_width_height", "swap_pooled", "no_zeroed_negatives"])
def test_broken_conditioning_fails_parity(models, monkeypatch, breakage):
    """Each seam the parity tests guard, broken on purpose: the same comparison then fails."""
    if breakage == "no_time_ids":
        monkeypatch.setattr(SDXL, "_image_size_ids", _broken_image_size_ids)
    elif breakage == "time_ids_width_height":
        monkeypatch.setattr(SDXL, "_image_size_ids", _hw_swapped(SDXL._image_size_ids))
    elif breakage == "swap_pooled":
        monkeypatch.setattr(SDXL, "encode", _swapped_pooled(SDXL.encode))
    else:
        monkeypatch.setattr(SDXL, "force_zeros", property(lambda self: False))
    assert txt2img_error(models["base"]) > 1e-4


# ------------------------------------------------------------------------------------------- loading
def test_folders_are_recognised_from_model_index(models):
    base, refiner, inp = models["base"], models["refiner"], models["inpainting"]
    assert base.info["pipeline_config"] == {"force_zeros_for_empty_prompt": True}
    assert base.family.force_zeros and not base.family.aesthetic
    assert refiner.modules["text_encoder"] is None and refiner.family.tokenizer is refiner.modules["tokenizer_2"]
    assert refiner.family.aesthetic and not refiner.family.force_zeros
    assert inp.family.in_channels == 9 and inp.info["pipeline_class"] == "StableDiffusionXLInpaintPipeline"
    # a folder whose model_index.json does not say force_zeros_for_empty_prompt: the pipeline class's default
    assert SDXL(type(base)("x", base.modules, base.scheduler_config, base.device, base.dtype,
                           info={"pipeline_class": "StableDiffusionXLImg2ImgPipeline"})).force_zeros


@pytest.mark.parametrize("model,hub_id", [("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
                                          ("sdxl_refiner", "stabilityai/stable-diffusion-xl-refiner-1.0")])
def test_sdxl_offline_is_one_clear_line(model, hub_id):
    from stablefused.config import validate
    from stablefused.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(f"model={model}", "model.original_size=[1024,1024]"))
    lines = str(e.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"model={model}: {hub_id} is not downloaded and the hub is offline")
    assert f"hf download {hub_id}" in lines[0]


def test_linear_preview_uses_sdxl_coefficients():
    from types import SimpleNamespace

    from stablefused.preview import known_preview

    vae = SimpleNamespace(dtype=torch.float32, config=SimpleNamespace(latent_channels=4, scaling_factor=0.13025,
                                                                      block_out_channels=[128, 256, 512, 512]))
    fake = SimpleNamespace(vae=vae, info={}, modules={})
    prev = known_preview(SimpleNamespace(c=fake, family=SDXL(fake)))
    assert prev is not None and "sdxl" in prev.source
    # latent (1, 0, 0, 0) → (0.3651 + 0.1084, ...) in [-1, 1] → mapped to [0, 1]
    rgb = prev(torch.tensor([1.0, 0, 0, 0]).reshape(1, 4, 1, 1))[0, 0, 0]
    assert np.allclose(rgb, (np.array([0.3651 + 0.1084, 0.4232 - 0.0175, 0.4341 - 0.0011]) + 1) / 2, atol=1e-6)
    tiny = build_tiny_sdxl()
    assert known_preview(SimpleNamespace(c=tiny, family=tiny.family)) is None  # another VAE: fitted


# ------------------------------------------------------------------------------------------- the tasks
def _manifest(run_dir):
    return [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]


def _images_decode(run_dir, n):
    """Every image record decodes and is not blank; ``n`` of them are generated images."""
    recs = [m for m in _manifest(run_dir) if m["type"] == "image"]
    for m in recs:
        a = np.asarray(Image.open(run_dir / m["path"]).convert("RGB"))
        assert a.shape[2] == 3 and a.std() > 0
    assert len([m for m in recs if m["path"].startswith("images/")]) == n
    return recs


SDXL_RUN = ("model=tiny_sdxl", "steps=3", "seeds=[1]", "prompts=[a red circle]")


def test_tasks_on_tiny_sdxl(tmp_path):
    """txt2img with every recorder and visualizer, img2img, inpaint, and a walk with recorders."""
    run(compose_cfg(*SDXL_RUN, "guidance_scales=[0,7.5]", "recorders=[x0,latents,stats,attention,noise]",
                    "visualizers=[step_strip,attention_maps,stats_plot,denoise_video]",
                    "visualizers.step_strip.decode=linear"), tmp_path / "t2i")
    _images_decode(tmp_path / "t2i", 2)
    made = {p.name for p in (tmp_path / "t2i").rglob("*") if p.is_file()}
    assert any(n.startswith("attention_maps") for n in made) and any(n.startswith("denoise") for n in made)
    assert any(n.startswith("stats_plot") for n in made)
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    _sources()[0].resize((16, 16)).save(src)
    _masks()[0].resize((16, 16)).save(mask)
    run(compose_cfg(*SDXL_RUN, "task=img2img", f"init_image={src}", "strengths=[0.7]", "recorders=[x0]"),
        tmp_path / "i2i")
    _images_decode(tmp_path / "i2i", 1)
    run(compose_cfg(*SDXL_RUN, "task=inpaint", f"init_image={src}", f"mask_image={mask}", "strengths=[1.0]"),
        tmp_path / "inp")
    _images_decode(tmp_path / "inp", 1)
    run(compose_cfg("model=tiny_sdxl", "steps=2", "task=walk", "prompts=[a red circle,a blue square]",
                    "seeds=[1,2]", "segment_frames=2", "recorders=[x0,stats]"), tmp_path / "walk")
    assert len(list((tmp_path / "walk").rglob("*.png"))) >= 3 and list((tmp_path / "walk").rglob("*.mp4"))


@pytest.mark.parametrize("grid", ["schedules", "rules"])
def test_every_guidance_schedule_and_rule_on_tiny_sdxl(tmp_path, grid):
    run(compose_cfg(*SDXL_RUN, "task=guidance_grid", f"guidance={grid}", "guidance_scales=[0,1,5]"), tmp_path)
    n = {"schedules": 6, "rules": 5}[grid]
    _images_decode(tmp_path, 3 * n)


# ------------------------------------------------------------------------------------------- base + refiner
@pytest.mark.parametrize("sched,handover", [("euler", 0.8), ("dpmpp_2m", 0.6)])
def test_refiner_handover_parity(models, sched, handover):
    """denoising_end on the base, denoising_start on the refiner, latents handed over undecoded."""
    from stablefused.families.sdxl import txt2img_refined

    base, refiner, cls = models["base"], models["refiner"], SCHEDULERS[sched]
    gens = _gens()
    latents = _pipe(StableDiffusionXLPipeline, base, cls.from_config(base.scheduler_config))(
        PROMPTS, num_inference_steps=STEPS + 3, guidance_scale=7.5, height=H, width=W, generator=gens,
        denoising_end=handover, output_type="latent").images
    ref = _pipe(StableDiffusionXLImg2ImgPipeline, refiner, cls.from_config(refiner.scheduler_config))(
        PROMPTS, image=latents, num_inference_steps=STEPS + 3, guidance_scale=7.5, generator=gens,
        denoising_start=handover, output_type="np").images
    ours = txt2img_refined(Sampler(base, cls.from_config(base.scheduler_config)),
                           Sampler(refiner, cls.from_config(refiner.scheduler_config)), PROMPTS, SEEDS, 7.5,
                           steps=STEPS + 3, handover=handover, height=H, width=W, progress=False)
    assert np.abs(ours.images - ref).max() <= 1e-5
    assert 0 < ours.context.stats["model_calls"] < STEPS + 3  # the refiner ran only the tail of the schedule


def test_bad_micro_conditioning_settings_are_one_line_each():
    from stablefused.config import validate
    from stablefused.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("model=tiny_sdxl", "model.original_size=[1024]", "model.crops_coords_top_left=[-1,0]",
                             "model.aesthetic_score=high"))
    assert str(e.value).splitlines() == [
        "model.original_size=[1024]: must be two integers, [height, width] in pixels, e.g. model.original_size=[1024,1024]",
        "model.crops_coords_top_left=[-1, 0]: must be two integers, [top, left] pixel offsets >= 0, e.g. "
        "model.crops_coords_top_left=[0,0]",
        "model.aesthetic_score='high': must be a number (SDXL's default 6.0)"]


def test_float16_runs_the_vae_in_float32_as_the_pipeline_upcasts_it():
    """force_upcast in the VAE config (SDXL's VAE overflows in float16): the pipeline decodes (and img2img
    encodes) in float32; so does the family. A VAE without it stays in float16."""
    comps = build_tiny_sdxl()
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.modules["text_encoder_2"]):
        m.to(torch.float16)
    comps.dtype = torch.float16
    fam = comps.family
    assert comps.vae.dtype == torch.float32 and comps.unet.dtype == torch.float16
    images = fam.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    comps.vae.to(torch.float16)
    comps.vae.register_to_config(force_upcast=False)
    comps.family
    assert comps.vae.dtype == torch.float16


def test_vae_latents_mean_std_parity(tmp_path):
    """A VAE whose config has latents_mean/latents_std (Playground-v2.5-style): the pipelines normalise the
    encoded latents with them and denormalise before decoding; so do we."""
    comps = build_tiny_sdxl(seed=9)
    comps.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 1.5, 1.0, 2.0])
    comps = _save_and_load(comps, tmp_path / "sdxl_latents_stats")
    assert comps.vae.config.latents_std == [0.5, 1.5, 1.0, 2.0]
    assert txt2img_error(comps) <= 1e-5
    ref = _pipe(StableDiffusionXLImg2ImgPipeline, comps, EulerDiscreteScheduler.from_config(comps.scheduler_config))(
        PROMPTS, image=_sources(), strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5, generator=_gens(),
        output_type="np").images
    ours = img2img(Sampler(comps, EulerDiscreteScheduler.from_config(comps.scheduler_config)), _sources(), PROMPTS,
                   SEEDS, [7.5, 7.5], 0.6, "", steps=STEPS, progress=False).images
    assert np.abs(ours - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------- the refiner by config
REFINED_RUN = ("model=tiny_sdxl", "model.refiner=tiny_sdxl_refiner", "steps=4", "seeds=[1,2]",
               "prompts=[a red circle,a blue square on black]", "guidance_scales=[1,5]", "negative_prompt=green")


def _spy_refined(monkeypatch):
    """Every Generation txt2img_refined returns inside a run (the float images before they become PNGs)."""
    import stablefused.families.sdxl as sdxl_module

    seen, real = [], sdxl_module.txt2img_refined

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(sdxl_module, "txt2img_refined", spy)
    return seen


def _pngs(run_dir):
    recs = sorted((m for m in _manifest(run_dir) if m["type"] == "image"), key=lambda m: m["index"])
    return np.stack([np.asarray(Image.open(run_dir / m["path"]).convert("RGB")) for m in recs]), recs


def test_refiner_from_config_equals_txt2img_refined(tmp_path, monkeypatch):
    """model.refiner + model.refiner_handover on the command line: the same images as txt2img_refined called
    directly with the same components, seeds and handover (bit for bit, floats and PNGs); the refiner is
    loaded once per process; records and run.json say which refiner and where it took over; another handover
    makes other images and is another run for resume."""
    from stablefused.errors import ConfigError
    from stablefused.families.sdxl import txt2img_refined
    from stablefused.outputs import to_uint8
    from stablefused.runs import fingerprint, open_run_dir
    from stablefused.tasks import get_task

    seen = _spy_refined(monkeypatch)
    cfg = compose_cfg(*REFINED_RUN, "model.refiner_handover=0.5")
    r = run(cfg, tmp_path / "a")
    pngs, recs = _pngs(tmp_path / "a")
    assert len(seen) == 1 and len(recs) == 8  # 4 prompt/seed rows x 2 scales, one batch

    base = load_components(cfg.model, "cpu", "float32")
    refiner = load_components({"name": "tiny_sdxl_refiner", "builtin": "tiny_sdxl_refiner"}, "cpu", "float32")
    assert r.refiner.sampler.c.unet is refiner.unet and r.sampler.c.unet is base.unet  # the process's cache
    prompts, seeds, scales = [x["prompt"] for x in recs], [x["seed"] for x in recs], [x["guidance_scale"] for x in recs]
    direct = txt2img_refined(Sampler(base), Sampler(refiner), prompts, seeds, scales, "green", steps=4, handover=0.5,
                             height=16, width=16, progress=False)
    assert float(np.abs(seen[0].images - direct.images).max()) == 0.0
    assert np.array_equal(pngs, to_uint8(direct.images))
    assert recs[0]["refiner"] == "tiny_sdxl_refiner" and recs[0]["refiner_handover"] == 0.5
    assert recs[0]["refiner_start_step"] == 2  # leading spacing, 4 steps: 751 501 | 251 1
    # compute: both loops (base 2 steps + refiner 2 steps), scale 1 one row, scale 5 two
    assert r.stats == {"model_calls": 4, "unet_rows": 4 * (4 * 1 + 4 * 2)}
    fp = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert fp["model"]["refiner"] == "tiny_sdxl_refiner" and fp["model"]["refiner_handover"] == 0.5
    assert fp["refiner_model"] == {"name": "tiny_sdxl_refiner", "builtin": "tiny_sdxl_refiner"}

    # the default handover 0.8: the base runs 3 of 4 steps; other images, same cached refiner
    r2 = run(compose_cfg(*REFINED_RUN), tmp_path / "b")
    assert r2.refiner.sampler.c.unet is refiner.unet and r2.refiner.start_step == 3
    assert float(np.abs(seen[1].images - seen[0].images).max()) > 1e-3
    with pytest.raises(ConfigError, match=r"model.refiner_handover: 0.5 -> 0.8"):  # not taken for the 0.5 run
        open_run_dir(compose_cfg(*REFINED_RUN), tmp_path / "a", get_task("txt2img"))
    # without a refiner the handover changes nothing, and is no part of the run's identity
    assert fingerprint(compose_cfg("model=tiny_sdxl")) == fingerprint(compose_cfg("model=tiny_sdxl",
                                                                                  "model.refiner_handover=0.5"))


def test_refiner_from_config_matches_diffusers_base_then_refiner(models, tmp_path, monkeypatch):
    """model.path + model.refiner=<folder> against StableDiffusionXLPipeline(denoising_end) followed by
    StableDiffusionXLImg2ImgPipeline(denoising_start), as test_refiner_handover_parity runs them."""
    seen = _spy_refined(monkeypatch)
    base, refiner, handover, steps = models["base"], models["refiner"], 0.6, STEPS + 3
    run(compose_cfg("model=tiny_sdxl", "model.builtin=null", f"model.path={base.source}",
                    f"model.refiner={refiner.source}", f"model.refiner_handover={handover}", f"steps={steps}",
                    "prompts=[a red circle,a blue square on black]", "seeds=[3,4]", "combine=zip",
                    "guidance_scales=[7.5]", f"height={H}", f"width={W}"), tmp_path)
    gens = _gens()
    latents = _pipe(StableDiffusionXLPipeline, base, EulerDiscreteScheduler.from_config(base.scheduler_config))(
        PROMPTS, num_inference_steps=steps, guidance_scale=7.5, height=H, width=W, generator=gens,
        denoising_end=handover, output_type="latent").images
    ref = _pipe(StableDiffusionXLImg2ImgPipeline, refiner, EulerDiscreteScheduler.from_config(refiner.scheduler_config))(
        PROMPTS, image=latents, num_inference_steps=steps, guidance_scale=7.5, generator=gens,
        denoising_start=handover, output_type="np").images
    assert float(np.abs(seen[0].images - ref).max()) <= 1e-5


def test_refiner_on_guidance_grid(tmp_path):
    """guidance_grid shares txt2img's batches: every variant through base + refiner."""
    r = run(compose_cfg(*REFINED_RUN, "task=guidance_grid", "guidance=rules", "seeds=[1]",
                        "prompts=[a red circle]", "guidance_scales=[5]"), tmp_path)
    recs = _images_decode(tmp_path, 5)
    assert {m["refiner"] for m in recs} == {"tiny_sdxl_refiner"} and r.stats["model_calls"] == 5 * 4


def _refiner_lines(*overrides):
    from stablefused.config import validate
    from stablefused.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    return str(e.value).splitlines()


def test_refiner_settings_are_checked_before_loading_one_line_each():
    assert _refiner_lines("+model.refiner=tiny_sdxl_refiner", "+model.refiner_handover=1.5") == [
        "model.refiner_handover=1.5: must be a number in (0, 1), the fraction of the schedule the base model runs "
        "before the refiner (diffusers' denoising_end), e.g. 0.8",
        "model.refiner=tiny_sdxl_refiner: a refiner finishes an SDXL base model's images; model tiny_random is not "
        "SDXL (family sd); drop model.refiner"]
    lines = _refiner_lines("model=tiny_sdxl", "model.refiner=tiny_sdxl_refiner", "model.refiner_handover=0",
                           "scheduler=heun", "task=img2img", "init_image=shapes:red circle", "recorders=[x0]")
    assert [x for x in lines if x.startswith("model.refiner")] == [
        "model.refiner_handover=0: must be a number in (0, 1), the fraction of the schedule the base model runs "
        "before the refiner (diffusers' denoising_end), e.g. 0.8",
        "model.refiner=tiny_sdxl_refiner: task=img2img does not hand over to a refiner; guidance_grid and txt2img do "
        "(drop model.refiner)",
        "model.refiner=tiny_sdxl_refiner: scheduler=heun (HeunDiscreteScheduler) is a second-order scheduler; the "
        "handover splits a first-order schedule: use a first-order one (euler, dpm_multistep, ddim, ...)",
        "model.refiner=tiny_sdxl_refiner: recorders (x0) record one model's loop and a run with a refiner has two; "
        "drop the recorders or model.refiner"]
    assert _refiner_lines("model=tiny_sdxl", "model.refiner=nosuch") == [
        "model.refiner='nosuch': not a conf/model config, builtin model or model folder; e.g. model.refiner=sdxl_refiner"]
    assert _refiner_lines("model=tiny_sdxl", "model.refiner=tiny_random", "model.refiner_handover=true") == [
        "model.refiner_handover=True: must be a number in (0, 1), the fraction of the schedule the base model runs "
        "before the refiner (diffusers' denoising_end), e.g. 0.8",
        "model.refiner=tiny_random: not an SDXL model (family sd); the refiner takes the base's latents: an SDXL "
        "refiner, e.g. model.refiner=sdxl_refiner"]
    assert _refiner_lines("model=tiny_sdxl", "model.refiner=sdxl_refiner") == [
        "model.refiner=sdxl_refiner: stabilityai/stable-diffusion-xl-refiner-1.0 is not downloaded and the hub is "
        "offline (HF_HUB_OFFLINE is set); run `hf download stabilityai/stable-diffusion-xl-refiner-1.0` with "
        "network, or set model.refiner=<local SDXL refiner folder>"]
    assert _refiner_lines("model=tiny_sdxl", "model.refiner=tiny_sdxl_refiner", "guidance.rule=autoguidance",
                          "+guidance.rule_params.weak_model=tiny_sdxl") == [
        "guidance.rule=autoguidance: its second model (tiny_sdxl) takes the base model's conditioning, not the "
        "refiner's; drop model.refiner=tiny_sdxl_refiner or guide without a second model"]


def test_refiner_checks_that_need_the_loaded_base():
    """A hub model's family and the model's own scheduler class are known only once it is loaded: checked then,
    before the refiner loads, every line at once."""
    from stablefused.errors import ConfigError
    from stablefused.families.sdxl import load_refiner

    cfg = compose_cfg("+model.refiner=tiny_sdxl_refiner")
    base = load_components(cfg.model, "cpu", "float32")
    with pytest.raises(ConfigError) as e:
        load_refiner(cfg, base, base.make_scheduler("KDPM2DiscreteScheduler"))
    assert str(e.value).splitlines() == [
        "model.refiner=tiny_sdxl_refiner: a refiner finishes an SDXL base model's images; model tiny_random is not "
        "SDXL (family sd); drop model.refiner",
        "model.refiner=tiny_sdxl_refiner: KDPM2DiscreteScheduler is a second-order scheduler; the handover splits a "
        "first-order schedule: use a first-order one (euler, dpm_multistep, ddim, ...)"]


def test_refiner_override_reaches_the_check_on_any_model():
    """On the command line model.refiner is accepted on any model's config (++), so a non-SDXL model gets the
    refiner's own line instead of Hydra's "Could not override"."""
    from stablefused.app import model_key_overrides

    assert model_key_overrides(["model.refiner=sdxl_refiner", "model.refiner_handover=0.7", "steps=3"]) == [
        "++model.refiner=sdxl_refiner", "++model.refiner_handover=0.7", "steps=3"]
