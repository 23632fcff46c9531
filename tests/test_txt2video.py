"""task=txt2video: parity with diffusers' TextToVideoSDPipeline on a tiny random UNet3D loaded from a folder
through model.path, guidance <= 1 honoured, and a run's frames, MP4s, manifest, recorders and visualizers."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    TextToVideoSDPipeline,
    UNet3DConditionModel,
)
from omegaconf import OmegaConf
from PIL import Image

from stablefused import app
from stablefused.errors import ConfigError
from stablefused.models import _scheduler_dict, build_tiny_random, load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.txt2video import txt2video
from tests.conftest import compose_cfg

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]
SEEDS = [3, 7]
FRAMES, STEPS, H, W = 3, 4, 16, 24


def sd15_scheduler_config() -> dict:
    """SD-1.5's scheduler config (PNDM), as its folder ships it."""
    return _scheduler_dict(PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True,
    ))


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A TextToVideoSDPipeline folder: a tiny random UNet3D with build_tiny_random's VAE, text encoder and
    tokenizer, and SD-1.5's scheduler config."""
    comps = build_tiny_random()
    torch.manual_seed(0)
    comps.unet = UNet3DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    comps.scheduler_config = sd15_scheduler_config()
    folder = save_components(comps, tmp_path_factory.mktemp("video") / "tiny_video")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "TextToVideoSDPipeline"
    return folder


def model_cfg(folder):
    return OmegaConf.create({"name": "tiny_video", "path": str(folder), "size_multiple": 4, "height": H, "width": W,
                             "example_prompts": PROMPTS})


@pytest.fixture(scope="module")
def video(video_folder):
    comps = load_components(model_cfg(video_folder), "cpu", "float32")  # the real loading path (model.path)
    assert type(comps.unet).__name__ == "UNet3DConditionModel"
    return comps


def reference(folder, cls, prompts, scale, neg=NEG):
    """diffusers' own pipeline, loaded from the same folder, output_type np: (B, F, H, W, 3) in [0, 1]."""
    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(prompts, negative_prompt=neg, height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                guidance_scale=scale, generator=gens, output_type="np").frames


def ours(comps, cls, prompts, scales, neg=NEG):
    sampler = Sampler(comps, cls.from_config(comps.scheduler_config))
    return txt2video(sampler, prompts, SEEDS, scales, neg, frames=FRAMES, steps=STEPS, height=H, width=W,
                     progress=False)


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_parity_with_text_to_video_pipeline(video_folder, video, cls, scale):
    ref = reference(video_folder, cls, PROMPTS, scale)
    got = ours(video, cls, PROMPTS, [scale, scale])
    assert got.images.shape == ref.shape == (2, FRAMES, H, W, 3)
    assert got.latents.shape == (2, 4, FRAMES, H // 2, W // 2)
    assert np.abs(got.images - ref).max() <= 1e-5
    assert np.abs(got.images[:, 0] - got.images[:, 1]).max() > 1e-3  # frames differ: a real video axis


def test_guidance_zero_and_one_are_honoured(video_folder, video):
    """The pipeline turns guidance off at <= 1; the loop does not: w=1 is the prompt alone (the pipeline with
    guidance off), w=0 the negative prompt alone (the pipeline on the negative prompt), both differ from 7.5."""
    cls = DDIMScheduler
    got = {w: ours(video, cls, PROMPTS, [w, w]).images for w in (0.0, 1.0, 7.5)}
    assert np.abs(got[1.0] - reference(video_folder, cls, PROMPTS, 1.0)).max() <= 1e-5
    assert np.abs(got[0.0] - reference(video_folder, cls, NEG, 1.0)).max() <= 1e-5
    for a, b in ((0.0, 1.0), (0.0, 7.5), (1.0, 7.5)):
        assert np.abs(got[a] - got[b]).max() > 1e-3, (a, b)


def run_cfg(folder, *overrides):
    cfg = compose_cfg("task=txt2video", f"video_frames={FRAMES}", "video_fps=4", f"steps={STEPS}", "seeds=[5]",
                      "guidance_scales=[1.0,7.5]", "batch_size=2", *overrides)
    cfg.model = model_cfg(folder)
    return cfg


def test_run_writes_frames_mp4_strip_manifest_and_visualizers(video_folder, video, tmp_path):
    cfg = run_cfg(video_folder, "recorders=[x0]", "visualizers=[denoise_video,step_strip]",
                  "visualizers.denoise_video.panels=[x0]")
    run = app.run(cfg, tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    frames = [r for r in recs if r["type"] == "frame"]
    videos = [r for r in recs if r["type"] == "video" and "index" in r]
    n = len(PROMPTS) * 2  # prompts x guidance scales, one seed
    assert len(frames) == n * FRAMES and len(videos) == n
    assert sorted({(r["index"], r["frame"]) for r in frames}) == [(i, k) for i in range(n) for k in range(FRAMES)]
    for r in frames:
        assert r["prompt"] in PROMPTS and r["seed"] == 5 and r["guidance_scale"] in (1.0, 7.5)
        img = Image.open(tmp_path / r["path"])
        assert img.format == "PNG" and img.size == (W, H)

    # The frames are the loop's output: the PNGs equal the diffusers pipeline's frames (8-bit rounding).
    cell = next(r for r in frames if r["index"] == 1)  # prompt 0, guidance 7.5
    assert cell["prompt"] == PROMPTS[0] and cell["guidance_scale"] == 7.5
    pipe = TextToVideoSDPipeline.from_pretrained(video_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(5)], output_type="np").frames[0]
    png = np.stack([np.asarray(Image.open(tmp_path / r["path"])) for r in frames if r["index"] == 1])
    assert np.abs(png.astype(int) - (ref * 255).round().astype(int)).max() <= 1

    for v in videos:
        mp4 = iio.imread(tmp_path / v["path"])
        assert mp4.shape == (FRAMES, H, W, 3) and v["frames"] == FRAMES and v["fps"] == 4
    strips = [r for r in recs if r["type"] == "strip"]
    assert len(strips) == n and Image.open(tmp_path / strips[0]["path"]).size == (W * FRAMES, H)
    images = [r for r in recs if r["type"] == "image" and "index" in r]
    assert len(images) == n and all(r["frame"] == FRAMES // 2 for r in images)
    mid = np.asarray(Image.open(tmp_path / images[1]["path"]))
    assert np.array_equal(mid, png[FRAMES // 2])  # the image record is the middle frame

    # Recorders keep the frame axis; the visualizers show the middle frame.
    from stablefused.records import load

    rec = load(tmp_path)
    steps = len(rec.steps("x0"))  # SD-1.5's PNDM (the folder's scheduler): one more call than steps
    assert steps == STEPS + 1 and rec.index["tensors"]["x0"]["dims"][3] == "frame"
    assert rec["x0"].shape == (n, steps, 4, FRAMES, H // 2, W // 2)
    assert iio.imread(tmp_path / "denoise.mp4").shape[0] == steps + 8  # one frame per step + hold
    assert (tmp_path / "step_strip_x0.png").is_file()
    assert (tmp_path / "grid.png").is_file() and len(run.records) == n


def test_rerun_resumes_videos_and_keeps_their_records(video_folder, video, tmp_path):
    cfg = run_cfg(video_folder, "recorders=[x0]", "visualizers=[step_strip]")  # its image artifact has no index
    app.run(cfg, tmp_path)
    first = (tmp_path / "manifest.jsonl").read_text().splitlines()
    # Interrupt after the first video: drop everything written after its image record.
    cut = next(i for i, line in enumerate(first) if json.loads(line)["type"] == "image") + 1
    (tmp_path / "manifest.jsonl").write_text("\n".join(first[:cut]) + "\n")
    mtime = (tmp_path / json.loads(first[0])["path"]).stat().st_mtime_ns
    app.run(cfg, tmp_path)
    second = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert (tmp_path / second[0]["path"]).stat().st_mtime_ns == mtime  # video 0 not made again
    for kind in ("frame", "video", "strip", "image"):
        assert (sum(json.loads(line)["type"] == kind for line in first)
                == sum(r["type"] == kind for r in second)), kind


def test_bad_settings_and_image_models(tmp_path):
    with pytest.raises(ConfigError, match=r"video_frames=0: must be an integer >= 1"):
        app.run(compose_cfg("task=txt2video", "video_frames=0"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"task=txt2video: model tiny_random has a UNet2DConditionModel"):
        app.run(compose_cfg("task=txt2video", "video_frames=2", "steps=1", "seeds=[0]"), tmp_path / "b")


def test_recorders_and_previews_on_video_latents(video_folder, video, tmp_path):
    """Every recorder on 5-D latents; a linear preview fitted on a chosen frame; attention maps per video."""
    cfg = run_cfg(video_folder, "recorders=[x0,latents,stats,attention]", "visualizers=[denoise_video,step_strip]",
                  "visualizers.denoise_video.decode=linear", "visualizers.denoise_video.frame=0",
                  "visualizers.step_strip.frame=-1", "guidance_scales=[7.5]")
    app.run(cfg, tmp_path)  # raises if a recorder or visualizer failed
    from stablefused.records import load

    rec = load(tmp_path)
    n, s = len(PROMPTS), len(rec.steps("x0"))
    for key in ("x0", "x_t", "x_prev"):
        assert rec[key].shape == (n, s, 4, FRAMES, H // 2, W // 2), key
    assert rec.stats["guidance_delta_norm"].shape == (n, s) and bool((rec.stats["guidance_delta_norm"] > 0).all())
    att = rec["attention"]
    assert att.shape == (n, 16, H // 2, W // 2)  # (videos, tokens, h, w): averaged over the frames
    assert torch.allclose(att.sum(1), torch.ones(n, H // 2, W // 2), atol=1e-4)
    assert (tmp_path / "denoise.mp4").is_file() and (tmp_path / "step_strip_x0.png").is_file()


def test_one_frame_picks_frames_of_video_records_only():
    from stablefused.preview import one_frame

    x = torch.arange(2 * 3 * 5 * 2 * 4).float().reshape(2, 3, 5, 2, 4)  # (S, C, F, h, w)
    dims = ("step", "channel", "frame", "height", "width")
    assert torch.equal(one_frame(x, dims), x[:, :, 2])
    assert torch.equal(one_frame(x, dims, 0), x[:, :, 0]) and torch.equal(one_frame(x, dims, -1), x[:, :, 4])
    assert one_frame(x, ("sample", "channel", "height", "width", "x")) is x
    with pytest.raises(IndexError, match="frame=5"):
        one_frame(x, dims, 5)
