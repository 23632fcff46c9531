"""img2img: parity with StableDiffusionImg2ImgPipeline (same components, one generator per image) on an
SD-1.5-style scheduler config loaded from disk, UNet calls = the pipeline's, the task end to end (records,
grid, converted inputs, denoise video from start_step), and one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    HeunDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from stablefused.app import run
from stablefused.config import validate
from stablefused.errors import ConfigError
from stablefused.models import build_tiny_random, load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.img2img import img2img
from tests.conftest import compose_cfg

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]
SEEDS = [3, 7]
STEPS = 10


def _sources(w=24, h=16):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.zeros((h, w, 3), np.uint8)
    b[4:12, 6:18] = (30, 60, 230)
    return [Image.fromarray(a), Image.fromarray(b)]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """Tiny components with an SD-1.5 scheduler config, saved as a diffusers folder and loaded back."""
    comps = build_tiny_random(seed=5)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True)
    comps.scheduler_config = {**sched.config, "_class_name": "PNDMScheduler"}
    folder = save_components(comps, tmp_path_factory.mktemp("sd15") / "model")
    # SD-1.5's scheduler_config.json also says clip_sample: false (PNDM has no such parameter, so it is not
    # saved; DDIM would default to true, which the diffusers pipelines override to false)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False}))
    loaded = load_components({"name": "sd15_tiny", "path": str(folder)}, "cpu", "float32")
    assert loaded.scheduler_config["_class_name"] == "PNDMScheduler"
    assert loaded.scheduler_config["steps_offset"] == 1 and loaded.scheduler_config["timestep_spacing"] == "leading"
    return loaded


class Calls:
    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def reference(comps, scheduler, sources, strength, scale=7.5):
    pipe = StableDiffusionImg2ImgPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = Calls(comps.unet)
    try:
        out = pipe(PROMPTS, image=sources, strength=strength, num_inference_steps=STEPS, guidance_scale=scale,
                   negative_prompt=NEG, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                   output_type="np").images
    finally:
        calls.handle.remove()
    return out, calls.n


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_parity_with_img2img_pipeline(sd15, cls, strength):
    ref, ref_calls = reference(sd15, cls.from_config(sd15.scheduler_config), _sources(), strength)
    gen = img2img(Sampler(sd15, cls.from_config(sd15.scheduler_config)), _sources(), PROMPTS, SEEDS, [7.5, 7.5],
                  strength, NEG, steps=STEPS, progress=False)
    assert gen.images.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(gen.images - ref).max() <= 1e-5
    # only the pipeline's int(strength * steps) steps run: one UNet call (batch [uncond, cond]) each
    assert gen.context.stats["model_calls"] == ref_calls == int(strength * STEPS)
    assert len(gen.context.timesteps) == int(strength * STEPS)


@pytest.mark.parametrize("cls,strength", [(HeunDiscreteScheduler, 0.5), (EulerAncestralDiscreteScheduler, 0.6)])
def test_parity_second_order_and_ancestral(sd15, cls, strength):
    """Heun: begin index t_start * order; Euler ancestral: the step noise comes after the VAE sample and the
    initial noise from the same generators."""
    ref, ref_calls = reference(sd15, cls.from_config(sd15.scheduler_config), _sources(), strength)
    gen = img2img(Sampler(sd15, cls.from_config(sd15.scheduler_config)), _sources(), PROMPTS, SEEDS, [7.5, 7.5],
                  strength, NEG, steps=STEPS, progress=False)
    assert np.abs(gen.images - ref).max() <= 1e-5
    assert gen.context.stats["model_calls"] == ref_calls
    if cls is HeunDiscreteScheduler:  # timesteps [t0, t1, t1, t2, t2, ...][t_start * 2:]: 2 * 10 - 1 - 2 * 5
        assert ref_calls == 9


def test_parity_on_the_tiny_models_own_config(tiny):
    ref, _ = reference(tiny, DDIMScheduler.from_config(tiny.scheduler_config), _sources(), 0.6, scale=4.0)
    gen = img2img(Sampler(tiny, DDIMScheduler.from_config(tiny.scheduler_config)), _sources(), PROMPTS, SEEDS,
                  [4.0, 4.0], 0.6, NEG, steps=STEPS, progress=False)
    assert np.abs(gen.images - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------- task
def _manifest(run_dir):
    return [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]


def test_task_end_to_end_matches_the_pipeline(tmp_path, tiny):
    """Through the CLI path: an RGBA and a 16-bit source (converted), a folder = two rows; the written PNGs
    equal the pipeline's images (to PNG rounding); records and grid as documented."""
    src = _sources()
    folder = tmp_path / "in"
    folder.mkdir()
    rgba = np.concatenate([np.asarray(src[0]), np.full((16, 24, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    Image.fromarray((np.asarray(src[1])[..., 2].astype(np.uint16) * 257)).save(folder / "b.png")  # 16-bit grey
    out = tmp_path / "run"
    cfg = compose_cfg("task=img2img", f"init_image={folder}", "prompts=[a red circle]", "seeds=[3]",
                      "strengths=[0.5,1.0]", "guidance_scales=[1.5,7.5]", "steps=4", "scheduler=ddim")
    r = run(cfg, out)
    recs = [m for m in _manifest(out) if m["type"] == "image"]
    assert len(recs) == 2 * 2 * 2  # rows (2 sources x 1 prompt/seed) x strengths x guidance
    assert {(m["strength"], m["resize"]) for m in recs} == {(0.5, "crop"), (1.0, "crop")}
    assert {m["init_image"] for m in recs} == {str(folder / "a.png"), str(folder / "b.png")}
    assert all(m["height"] == 16 and m["width"] == 24 for m in recs)
    inputs = [m for m in _manifest(out) if m["type"] == "input"]
    assert [m["converted"] is not None for m in inputs] == [True, True]
    assert Image.open(out / "grid.png").size[0] > Image.open(out / "grid.png").size[1]
    # cell (row 1 = b.png, strength 1.0, w=7.5) equals the pipeline on the converted source
    rec = next(m for m in recs if m["row"] == 1 and m["strength"] == 1.0 and m["guidance_scale"] == 7.5)
    assert rec["col"] == 4 and rec["index"] == 7
    b = Image.open(out / "inputs" / "source_01.png")
    pipe = StableDiffusionImg2ImgPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=r.sampler.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle"], image=[b], strength=1.0, num_inference_steps=4, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]
    ours = np.asarray(Image.open(out / rec["path"]), np.float32) / 255
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-6


def test_denoise_video_starts_at_start_step(tmp_path):
    out = tmp_path / "run"
    src = tmp_path / "s.png"
    _sources()[1].save(src)
    cfg = compose_cfg("task=img2img", f"init_image={src}", "prompts=[a red circle]", "seeds=[0]",
                      "strengths=[0.5]", "steps=6", "scheduler=ddim", "recorders=[latents,x0]",
                      "visualizers=[denoise_video]", "visualizers.denoise_video.hold=2",
                      "visualizers.denoise_video.decode=linear")
    r = run(cfg, out)
    from stablefused import records

    rec = records.load(out)
    sched = r.sampler.scheduler
    sched.set_timesteps(6)
    assert rec.t("x0") == [float(t) for t in sched.timesteps[3:]]  # the last int(0.5 * 6) = 3 steps
    assert rec.info("x0")["start_step"] == 3
    import imageio.v2 as iio

    reader = iio.get_reader(str(out / "denoise.mp4"), format="FFMPEG")
    assert sum(1 for _ in reader) == 3 + 2
    reader.close()


# ------------------------------------------------------------------------------------------- bad input
def _problems(*overrides):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("task=img2img", *overrides))
    return str(e.value).splitlines()


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "ok.png"
    _sources()[0].save(p)
    return p


@pytest.mark.parametrize("strengths,needle", [
    ("[0]", "strengths: 0 is not in (0, 1]"), ("[1.5]", "strengths: 1.5 is not in (0, 1]"),
    ("[nan]", "strengths: nan is not in (0, 1]"), ("0.5", "strengths=0.5: must be a list"),
    ("[0.04]", "strengths: 0.04 x steps=20 runs no denoising step"),
])
def test_bad_strengths(png, strengths, needle):
    lines = _problems(f"init_image={png}", f"strengths={strengths}")
    assert len(lines) == 1 and lines[0].startswith(needle)


def test_bad_images(tmp_path, png):
    assert _problems()[0].startswith("init_image: not set")
    assert "no such file" in _problems(f"init_image={tmp_path / 'nope.png'}")[0]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "bad.png: cannot read it as an image" in _problems(f"init_image={tmp_path / 'bad.png'}")[0]
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 120)).save(big)
    (line,) = _problems(f"init_image={big}")
    assert line.startswith(f"init_image={big}: a 200x120 image gives 200x120 outputs") and "height=16 width=16" in line
    validate(compose_cfg("task=img2img", f"init_image={big}", "height=16", "width=16"))  # resized: fine
    validate(compose_cfg("task=img2img", f"init_image={big}", "max_size=16"))  # allowed explicitly
    assert _problems(f"init_image={png}", "resize=fill")[0].startswith("resize='fill': must be one of crop")
    lines = _problems(f"init_image={png}", "recorders=[x0]")
    assert lines[0].startswith("strengths=[0.3, 0.6, 0.9]: recorders keep one step axis")


def test_unreadable_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    import stablefused.app as app

    monkeypatch.setattr(app, "load_components", lambda *a, **k: pytest.fail("model loaded"))
    p = tmp_path / "x.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ConfigError, match="x.jpg: cannot read it as an image"):
        run(compose_cfg("task=img2img", f"init_image={p}"), tmp_path / "run")


def test_strength_experiment_writes_the_tradeoff(tmp_path):
    """experiment=img2img_strength, cut down: shapes: sources rendered, both scores, trade-off files."""
    from hydra import compose, initialize_config_dir

    from stablefused.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=img2img_strength", "logger=none", "progress=false",
                                           "seeds=[0]", "strengths=[0.5,1.0]", "guidance_scales=[3]", "steps=6"])
    assert cfg.model.name == "shapes"
    run(cfg, tmp_path)
    recs = [m for m in _manifest(tmp_path) if m["type"] == "image"]
    assert len(recs) == 2 * 2 * 2 and all(m["source"].startswith("a ") for m in recs)
    assert all("shapes_adherence/mean" in m and "shapes_adherence_source/mean" in m for m in recs)
    out = json.loads((tmp_path / "tradeoff.json").read_text())
    assert out["strengths"] == [0.5, 1.0] and set(out["means"]) == {"shapes_adherence/mean", "shapes_adherence_source/mean"}
    assert "crossover" in out and (tmp_path / "tradeoff.png").is_file() and (tmp_path / "tradeoff.md").is_file()
    assert len(list((tmp_path / "inputs").glob("*.png"))) == 2
