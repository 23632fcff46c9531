"""inpaint: parity with StableDiffusionInpaintPipeline (same components, one generator per image, the
pipeline's own mask processing, float outputs) for a 9-channel inpainting UNet and an ordinary 4-channel one,
on an SD-1.5-style scheduler config loaded from disk; paste-back keeps the unmasked pixels exactly; the task
end to end (records, grid, inputs, recorders and the denoise video); one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
    StableDiffusionInpaintPipeline, UNet2DConditionModel,
)
from PIL import Image, ImageDraw, ImageFilter

from stablefused import masks as mk
from stablefused.app import run
from stablefused.config import validate
from stablefused.errors import ConfigError
from stablefused.models import build_tiny_random, load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.inpaint import inpaint
from tests.conftest import compose_cfg

from tests.test_img2img import NEG, PROMPTS, SEEDS, STEPS, _sources  # noqa: E402  the same inputs as img2img's


def _masks(w=24, h=16):
    a = Image.new("L", (w, h), 0)
    ImageDraw.Draw(a).rectangle([4, 2, 15, 11], fill=255)
    b = Image.new("L", (w, h), 0)
    ImageDraw.Draw(b).ellipse([10, 3, 21, 14], fill=255)
    return [a, b.filter(ImageFilter.GaussianBlur(1.5))]  # soft: the pipeline binarises it at 0.5


def _sd15(comps, folder):
    """``comps`` with an SD-1.5 scheduler config, saved as a diffusers folder and loaded back."""
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True)
    comps.scheduler_config = {**sched.config, "_class_name": "PNDMScheduler"}
    folder = save_components(comps, folder)
    path = folder / "scheduler" / "scheduler_config.json"  # SD-1.5's file also says clip_sample: false
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False}))
    loaded = load_components({"name": folder.name, "path": str(folder)}, "cpu", "float32")
    assert loaded.scheduler_config["steps_offset"] == 1 and loaded.scheduler_config["timestep_spacing"] == "leading"
    return loaded


def build_tiny_inpainting(seed: int = 5):
    """The tiny random model with a 9-channel UNet (latents + mask + masked-image latents)."""
    comps = build_tiny_random(seed=seed)
    torch.manual_seed(seed + 1)
    comps.unet = UNet2DConditionModel.from_config({**comps.unet.config, "in_channels": 9})
    return comps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint_models")
    m9 = _sd15(build_tiny_inpainting(), root / "sd15_inpainting")
    assert m9.unet.config.in_channels == 9
    return {4: _sd15(build_tiny_random(seed=5), root / "sd15"), 9: m9}


class Calls:
    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def reference(comps, scheduler, sources, masks, strength, scale=7.5):
    pipe = StableDiffusionInpaintPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = Calls(comps.unet)
    w, h = sources[0].size
    try:
        out = pipe(PROMPTS, image=sources, mask_image=masks, height=h, width=w, strength=strength,
                   num_inference_steps=STEPS, guidance_scale=scale, negative_prompt=NEG, padding_mask_crop=None,
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np").images
    finally:
        calls.handle.remove()
    return out, calls.n


def ours(comps, cls, strength, scale=7.5):
    return inpaint(Sampler(comps, cls.from_config(comps.scheduler_config)), _sources(), _masks(), PROMPTS, SEEDS,
                   [scale, scale], strength, NEG, steps=STEPS, progress=False)


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_parity_with_inpaint_pipeline(models, channels, cls, strength):
    comps = models[channels]
    ref, ref_calls = reference(comps, cls.from_config(comps.scheduler_config), _sources(), _masks(), strength)
    gen = ours(comps, cls, strength)
    assert gen.images.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(gen.images - ref).max() <= 1e-5
    assert gen.context.stats["model_calls"] == ref_calls == int(strength * STEPS)


@pytest.mark.parametrize("channels", [9, 4])
def test_parity_ancestral_and_pndm(models, channels):
    """Euler ancestral draws step noise from the generators after the pipeline's VAE samples and initial
    noise (for a 4-channel UNet too, which does not use the masked image's latents); PNDM is SD-1.5's own."""
    comps = models[channels]
    for cls, strength in ((EulerAncestralDiscreteScheduler, 0.6), (EulerAncestralDiscreteScheduler, 1.0),
                          (PNDMScheduler, 0.7)):
        ref, _ = reference(comps, cls.from_config(comps.scheduler_config), _sources(), _masks(), strength)
        assert np.abs(ours(comps, cls, strength).images - ref).max() <= 1e-5, (cls.__name__, strength)


def test_the_mask_matters(models):
    """The 9-channel UNet sees the mask, the 4-channel path keeps the known region: change the mask and the
    outputs change (guards against a parity that ignores the mask on both sides)."""
    for channels in (9, 4):
        comps = models[channels]
        a = ours(comps, DDIMScheduler, 1.0).images
        b = inpaint(Sampler(comps, DDIMScheduler.from_config(comps.scheduler_config)), _sources(),
                    [Image.new("L", (24, 16), 255)] * 2, PROMPTS, SEEDS, [7.5, 7.5], 1.0, NEG, steps=STEPS,
                    progress=False).images
        assert np.abs(a - b).max() > 0.05


def test_hooks_after_the_blend_see_the_blended_latents(models):
    """Recorders come after the blend hook: the x_prev they see at the last step is the final latents."""
    from stablefused.hooks import BaseHook

    class Last(BaseHook):
        def on_step(self, state):
            self.x_prev = state.x_prev

    last = Last()
    comps = models[4]
    gen = inpaint(Sampler(comps, DDIMScheduler.from_config(comps.scheduler_config)), _sources(), _masks(), PROMPTS,
                  SEEDS, [7.5, 7.5], 0.6, NEG, steps=STEPS, hooks=[last], progress=False)
    assert torch.equal(last.x_prev, gen.latents)


# ------------------------------------------------------------------------------------------- task
def _manifest(run_dir):
    return [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255


@pytest.fixture
def files(tmp_path):
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    _sources()[0].save(src)
    _masks()[0].save(mask)
    return src, mask


def test_paste_back_keeps_the_unmasked_pixels_exactly(tmp_path, files):
    src, _ = files
    common = ("task=inpaint", f"init_image={src}", "mask=[rect:4,2,14,12]", "prompts=[a red circle]", "seeds=[3]",
              "steps=4", "scheduler=ddim", "strengths=[1.0,0.5]")
    r = run(compose_cfg(*common, "mask_blur=1.5"), tmp_path / "on")
    source, mask = _png(tmp_path / "on/inputs/source_00.png"), np.asarray(Image.open(tmp_path / "on/inputs/mask_00.png"))
    keep, seam = mask == 0, (mask > 0) & (mask < 255)
    assert keep.mean() > 0.25 and seam.any()  # the blur spreads the mask over a seam outside the rectangle
    recs = [m for m in _manifest(tmp_path / "on") if m["type"] == "image"]
    assert len(recs) == 2 and all(m["paste_back"] for m in recs)
    assert {m["mask_box"] == [4, 2, 14, 12] for m in recs} == {True}
    given = np.ones(mask.shape, bool)  # the pixels the user's mask keeps: everything outside the rectangle
    given[2:12, 4:14] = False
    for m in recs:
        out = _png(tmp_path / "on" / m["path"])
        assert np.array_equal(out[keep], source[keep])  # exactly the source's pixels beyond the seam
        assert np.abs(out[mask == 255] - source[mask == 255]).mean() > 0.05  # the masked region was repainted
        # outside_change is measured over what the user's mask keeps, the blurred seam included: the blur
        # changes kept pixels, and the number says so (it said 0 when measured beyond the seam only)
        measured = float(np.abs(out[given] - source[given]).mean())
        assert measured > 0 and m["outside_change"] == pytest.approx(measured, abs=1e-6)
    # without paste-back the VAE round trip changes the kept pixels: the test above would see a missing paste
    run(compose_cfg(*common, "mask_blur=1.5", "paste_back=false"), tmp_path / "off")
    recs = [m for m in _manifest(tmp_path / "off") if m["type"] == "image"]
    assert all(m["outside_change"] > 0.01 for m in recs)
    assert r.records[0]["unet_channels"] == 4


def test_default_blur_suits_the_image_size(tmp_path, files):
    """mask_blur=null (the default): min(height, width) / 128 px, diffusers' 4 px at 512 px; a 16 px image gets
    0.125 px, not a 4 px blur that would spread the seam over a quarter of it."""
    assert mk.default_blur(512, 512) == 4 and mk.default_blur(768, 1024) == 6 and mk.default_blur(16, 24) == 0.125
    src, _ = files
    run(compose_cfg("task=inpaint", f"init_image={src}", "mask=[rect:4,2,14,12]", "prompts=[a red circle]",
                    "seeds=[3]", "steps=2"), tmp_path / "run")
    recs = [m for m in _manifest(tmp_path / "run") if m["type"] == "image"]
    h, w = np.asarray(Image.open(tmp_path / "run" / recs[0]["path"])).shape[:2]
    assert recs[0]["mask_blur"] == mk.default_blur(h, w) == min(h, w) / 128
    mask = np.asarray(Image.open(tmp_path / "run/inputs/mask_00.png"))
    keep = np.ones(mask.shape, bool)
    keep[2:12, 4:14] = False
    assert mask[keep].max() <= 8  # the seam hardly reaches into the kept pixels (a 4 px blur: up to 110 of 255)


def test_all_white_mask_equals_img2img(tmp_path, files):
    """A 4-channel model with an all-white mask is image-to-image: the same PNGs as task=img2img (to one level
    of rounding: the two diffusers pipelines lay the source's latents out differently in memory, and the UNet's
    conv kernels then differ by ~1e-6)."""
    src, _ = files
    white = tmp_path / "white.png"
    Image.new("L", (24, 16), 255).save(white)
    common = (f"init_image={src}", "prompts=[a red circle]", "seeds=[3,4]", "steps=6", "scheduler=ddim",
              "strengths=[0.5]")
    run(compose_cfg("task=inpaint", f"mask_image={white}", *common), tmp_path / "inp")
    run(compose_cfg("task=img2img", *common), tmp_path / "i2i")
    a = sorted(m["path"] for m in _manifest(tmp_path / "inp") if m["type"] == "image")
    b = sorted(m["path"] for m in _manifest(tmp_path / "i2i") if m["type"] == "image")
    assert a == b and len(a) == 2
    for p in a:
        assert np.abs(_png(tmp_path / "inp" / p) - _png(tmp_path / "i2i" / p)).max() <= 1 / 255 + 1e-6


def test_inpainting_model_folder_is_picked_and_matches_the_pipeline(tmp_path, models, caplog):
    """model.path=<folder with a 9-channel UNet> runs the inpainting path by itself; a mask of another size
    and colour mode is resized and converted (said in the log); the output (no paste-back) equals the
    pipeline's on the inputs the run wrote."""
    src = tmp_path / "src.png"
    _sources()[1].save(src)
    mask = tmp_path / "mask.png"
    big = _masks()[1].resize((48, 32), Image.NEAREST).convert("RGB")
    big.save(mask)
    folder = tmp_path / "sd15_inpainting"
    save_components(models[9], folder)
    out = tmp_path / "run"
    caplog.set_level("INFO")
    run(compose_cfg("task=inpaint", f"model.path={folder}", "model.name=tiny_inpainting", f"init_image={src}",
                    f"mask_image={mask}", "prompts=[a red circle]", "seeds=[3]", "steps=5", "scheduler=ddim",
                    "strengths=[1.0]", "guidance_scales=[7.5]", "paste_back=false", "mask_blur=0"), out)
    assert "48x32 mask resized to the image's 24x16" in caplog.text and "RGB -> 8-bit greyscale" in caplog.text
    assert "9-channel UNet" in caplog.text
    (rec,) = [m for m in _manifest(out) if m["type"] == "image"]
    assert rec["unet_channels"] == 9 and rec["strength"] == 1.0
    comps = load_components({"name": "x", "path": str(folder)}, "cpu", "float32")
    pipe = StableDiffusionInpaintPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=DDIMScheduler.from_config(comps.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle"], image=Image.open(out / "inputs/source_00.png"),
               mask_image=Image.open(out / "inputs/mask_00.png"), height=16, width=24, num_inference_steps=5,
               generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]
    assert np.abs(_png(out / rec["path"]) - ref).max() <= 1 / 255 + 1e-6


def test_recorders_and_denoise_video(tmp_path, files):
    src, mask = files
    out = tmp_path / "run"
    r = run(compose_cfg("task=inpaint", f"init_image={src}", f"mask_image={mask}", "prompts=[a red circle]",
                        "seeds=[0]", "strengths=[0.5]", "steps=6", "scheduler=ddim", "recorders=[latents,x0]",
                        "visualizers=[denoise_video]", "visualizers.denoise_video.hold=2",
                        "visualizers.denoise_video.decode=linear"), out)
    from stablefused import records

    rec = records.load(out)
    sched = r.sampler.scheduler
    sched.set_timesteps(6)
    assert rec.t("x0") == [float(t) for t in sched.timesteps[3:]] and rec.info("x0")["start_step"] == 3
    import imageio.v2 as iio

    reader = iio.get_reader(str(out / "denoise.mp4"), format="FFMPEG")
    assert sum(1 for _ in reader) == 3 + 2
    reader.close()


# ------------------------------------------------------------------------------------------- bad input
def _problems(*overrides):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("task=inpaint", *overrides))
    return str(e.value).splitlines()


def test_bad_masks(tmp_path, files):
    src, mask = files
    black = tmp_path / "black.png"
    Image.new("L", (24, 16), 0).save(black)
    (line,) = _problems(f"init_image={src}", f"mask_image={black}")
    assert line.startswith(f"mask_image={black}: all black over {src}") and "nothing to repaint" in line
    (line,) = _problems(f"init_image={src}", "mask=[rect:30,0,40,8]")
    assert line.startswith("mask=rect:30,0,40,8: all black") and "outside the image" in line
    assert _problems(f"init_image={src}")[0].startswith("mask_image: not set")
    assert _problems(f"init_image={src}", f"mask_image={mask}", "mask=[rect:0,0,4,4]")[0].startswith(
        "mask_image and mask: both set")
    assert _problems(f"init_image={src}", "mask=[square:1,2,3]")[0].startswith("mask='square:1,2,3': not a mask shape")
    assert _problems(f"init_image={src}", "mask=[circle:1,2]")[0].startswith("mask='circle:1,2': circle takes 3")
    assert _problems(f"init_image={src}", "mask=[rect:4,4,2,8]")[0].startswith("mask='rect:4,4,2,8': the rectangle is empty")
    assert _problems(f"init_image={src}", f"mask_image={tmp_path / 'no.png'}")[0].startswith(
        f"mask_image={tmp_path / 'no.png'}: no such file")
    assert _problems(f"init_image={src}", f"mask_image=[{mask},{mask}]")[0].startswith(
        "mask_image: 2 masks for 1 source images")
    assert _problems(f"init_image={src}", f"mask_image={mask}", "mask_blur=-1")[0].startswith("mask_blur=-1")
    validate(compose_cfg("task=inpaint", f"init_image={src}", "mask=[rect:0,0,4,4,circle:20,8,3]"))  # a union


def test_empty_mask_fails_before_the_model_loads(tmp_path, files, monkeypatch):
    import stablefused.app as app

    src, _ = files
    monkeypatch.setattr(app, "load_components", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match="nothing to repaint"):
        run(compose_cfg("task=inpaint", f"init_image={src}", "mask=[circle:-20,-20,5]"), tmp_path / "run")


def test_shapes_adherence_region_scores_the_box_in_place():
    """region=mask_box: only the box is classified (a large red circle outside it is ignored) and a small
    shape stays small (the box is scored at the image's scale, not stretched)."""
    from stablefused.registry import create
    from stablefused.shapes.data import COLORS, shape_mask

    a = np.zeros((32, 32, 3), np.float32)
    a[shape_mask("circle", 20, 1, 1)] = COLORS["red"]
    a[shape_mask("triangle", 10, 20, 20)] = COLORS["yellow"]
    img = Image.fromarray((a * 255).astype(np.uint8))
    rec = {"prompt": "a small yellow triangle on a black background", "mask_box": [18, 18, 32, 32]}
    whole = create("metrics", "shapes_adherence")([img], [rec])[0]
    region = create("metrics", "shapes_adherence", region="mask_box")([img], [rec])[0]
    assert whole["shapes_adherence/color"] == 0.0 and whole["shapes_adherence/size"] == 0.0
    assert region["shapes_adherence/mean"] == 1.0
    assert create("metrics", "shapes_adherence", region="mask_box")([img], [{"prompt": rec["prompt"]}])[0] == whole


def test_inpaint_experiment_cut_down(tmp_path):
    from hydra import compose, initialize_config_dir

    from stablefused.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=inpaint", "logger=none", "progress=false", "seeds=[1]",
                                           "strengths=[1.0]", "steps=8",
                                           "prompts=[a small yellow triangle on a black background]"])
    assert cfg.model.name == "shapes"
    run(cfg, tmp_path)
    recs = [m for m in _manifest(tmp_path) if m["type"] == "image"]
    assert len(recs) == 2 and all(m["mask_box"] == [6, 11, 21, 26] and 0 < m["outside_change"] < 0.01 for m in recs)
    assert all(m["shapes_adherence/color"] == 1.0 for m in recs)  # yellow painted in the region
    assert all("shapes_adherence_source/mean" in m for m in recs)
    assert len(list((tmp_path / "inputs").glob("mask_*.png"))) == 2


def test_mask_shapes_are_drawn_in_source_pixels():
    from stablefused.masks import _specs, draw, parse_shape

    assert _specs(["rect:0", 0, 8, 8, "circle:20", 8, 3]) == ["rect:0,0,8,8", "circle:20,8,3"]  # Hydra's list
    m = np.asarray(draw([parse_shape("rect:0,0,8,8")], (24, 16))) > 0
    assert m.sum() == 64 and m[:8, :8].all()  # x1, y1 exclusive
    c = np.asarray(draw([parse_shape("circle:12,8,4")], (24, 16))) > 0
    assert abs(int(c.sum()) - np.pi * 16) < 8 and c[8, 12] and not c[8, 17]


def test_an_inpainting_model_under_txt2img_is_one_line(models):
    with pytest.raises(ConfigError, match="its UNet takes 9 input channels, this task gives it 4 \\(an inpainting "
                                          "model: use task=inpaint\\)"):
        Sampler(models[9]).txt2img(["a red circle"], [0], steps=2, progress=False)


def test_rerun_resumes_from_the_missing_image(tmp_path, files):
    """An interrupted inpainting run continues: the image whose PNG is missing is made again, identical."""
    src, mask = files
    cfg = compose_cfg("task=inpaint", f"init_image={src}", f"mask_image={mask}", "prompts=[a red circle]",
                      "seeds=[1,2]", "steps=3", "scheduler=ddim")
    run(cfg, tmp_path)
    recs = [m for m in _manifest(tmp_path) if m["type"] == "image"]
    first = {m["path"]: _png(tmp_path / m["path"]) for m in recs}
    (tmp_path / recs[1]["path"]).unlink()
    r = run(cfg, tmp_path)
    assert [m["path"] for m in r.records] == [m["path"] for m in recs]
    assert r.records[1]["outside_change"] == recs[1]["outside_change"]
    for p, img in first.items():
        assert np.array_equal(_png(tmp_path / p), img)
