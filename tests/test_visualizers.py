"""Visualizers end to end on the tiny model: videos decode with the expected frame count and size, strips,
attention maps and plots are written, listed in the manifest and need their recorders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import json

import imageio.v2 as iio
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stablefused import records
from stablefused.app import run
from stablefused.paths import config_dir




def cfg_of(*overrides):
    base = ["model=tiny_random", "logger=none", "progress=false"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


def frames_of(path):
    reader = iio.get_reader(str(path), format="FFMPEG")
    try:
        frames = [f for f in reader]
    finally:
        reader.close()
    return frames


def manifest(run_dir):
    return [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]


def test_denoise_video_experiment(tmp_path):
    r = run(cfg_of("experiment=denoise_video", "steps=5", "visualizers.denoise_video.hold=3"), tmp_path)
    entry = next(m for m in manifest(tmp_path) if m.get("path") == "denoise.mp4")
    frames = frames_of(tmp_path / "denoise.mp4")
    assert len(frames) == 5 + 3 == entry["frames"]  # one per step, then the end held for 3 frames
    h, w = frames[0].shape[:2]
    assert [w, h] == entry["size"] and w % 16 == 0 and h % 16 == 0
    # 2x2 layout: a cell is 2 panels of 128 px side by side, 2 cells per row
    assert w >= 2 * (2 * 128) and h >= 2 * 128
    assert not np.array_equal(frames[0], frames[4])  # the process moves
    assert np.abs(frames[-1].astype(int) - frames[-2].astype(int)).mean() < 2  # held end frames
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.size == (w, h) and gif.n_frames >= 5
    strip = Image.open(tmp_path / "step_strip_x0.png")
    assert strip.width > strip.height  # 4 rows x (5 steps + final)
    assert Image.open(tmp_path / "stats_plot.png").size[0] > 100
    listed = {m["path"]: m["type"] for m in manifest(tmp_path) if "path" in m}  # not the final run record
    assert listed["denoise.mp4"] == "video" and listed["denoise.gif"] == "video"
    assert listed["step_strip_x0.png"] == "image" and listed["stats_plot.png"] == "plot"
    assert len(r.images) == 4


def test_grid_and_sample_layouts_and_linear_preview(tmp_path):
    cfg = cfg_of("recorders=[latents,x0]", "visualizers=[denoise_video]", "steps=3", "seeds=[0]",
                 "guidance_scales=[-3,0,7.5]", "visualizers.denoise_video.hold=0",
                 "visualizers.denoise_video.rows=[1]", "visualizers.denoise_video.decode=linear")
    run(cfg, tmp_path / "grid")
    grid = frames_of(tmp_path / "grid" / "denoise.mp4")
    assert len(grid) == 3
    cfg = cfg_of("recorders=[x0]", "visualizers=[denoise_video]", "steps=3", "seeds=[0]",
                 "visualizers.denoise_video.layout=sample", "visualizers.denoise_video.sample=1",
                 "visualizers.denoise_video.panels=[x0]", "visualizers.denoise_video.hold=2",
                 "visualizers.denoise_video.fps=4")
    run(cfg, tmp_path / "one")
    one = frames_of(tmp_path / "one" / "denoise.mp4")
    assert len(one) == 5
    # one row of 3 guidance columns x 2 panels is wider than one sample with one panel
    assert grid[0].shape[1] > 2 * one[0].shape[1]


def test_negative_guidance_gains_a_process_video(tmp_path):
    run(cfg_of("experiment=negative_guidance", "steps=2", "seeds=[0]", "guidance_scales=[-3,0,3]",
               "visualizers.denoise_video.hold=1"), tmp_path)
    assert len(frames_of(tmp_path / "denoise.mp4")) == 3
    assert (tmp_path / "stats_plot.png").is_file()


def test_attention_maps(tmp_path):
    run(cfg_of("recorders=[attention]", "visualizers=[attention_maps]", "steps=2", "seeds=[0]"), tmp_path)
    rec = records.load(tmp_path)
    toks = rec.info("attention")["tokens"]
    assert toks["0"] == ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"]
    img = Image.open(tmp_path / "attention_maps.png")
    assert img.height > 2 * 96  # one row per prompt
    assert any(m["path"] == "attention_maps.png" and m["type"] == "image" for m in manifest(tmp_path))


def test_missing_recorder_fails_with_one_line(tmp_path):
    cfg = cfg_of("visualizers=[step_strip]", "recorders=[stats]", "steps=1", "seeds=[0]")
    from stablefused.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^visualizers.step_strip needs recorders=\[x0\]"):
        run(cfg, tmp_path)
    assert not (tmp_path / "images").exists()  # refused before sampling


def test_stats_logged_to_wandb_one_chart_per_statistic(tmp_path):
    from stablefused.logger import NullLogger

    charts = {}

    class Capture(NullLogger):
        run = object()  # as if a W&B run were open

        def line_series(self, key, xs, ys, keys, title, xname):
            charts[key] = (xs, ys, keys)

    import stablefused.app as app

    orig = app.make_logger
    app.make_logger = lambda *a, **k: Capture()
    try:
        run(cfg_of("recorders=[stats]", "steps=3", "seeds=[0]", "guidance_scales=[1,7.5]"), tmp_path)
    finally:
        app.make_logger = orig
    from stablefused import registry

    STATS = __import__(registry.get("recorders", "stats").__module__, fromlist=["STATS"]).STATS

    # one chart per statistic, not one per scale and stat; CFG has no third term, so no chart for it
    assert set(charts) == {f"denoise/{s}" for s in STATS if s != "extra_delta_norm"}
    xs, ys, keys = charts["denoise/nfe"]
    assert xs == [0, 1, 2] and keys == ["cfg w=1", "cfg w=7.5"] and ys == [[1.0] * 3, [2.0] * 3]
    # guidance 1 skipped the unconditional pass: its delta line has gaps (None), not zeros
    xs, ys, keys = charts["denoise/guidance_delta_norm"]
    assert keys == ["cfg w=7.5"] and all(v > 0 for v in ys[0])


def test_stats_plot_shows_a_gap_where_a_pass_was_skipped(tmp_path):
    from stablefused import registry

    run(cfg_of("recorders=[stats]", "visualizers=[stats_plot]", "steps=3", "seeds=[0]", "prompts=[a red circle]",
               "guidance_scales=[0,1,7.5]"), tmp_path)
    rec = records.load(tmp_path)
    delta, scale = rec.stats["guidance_delta_norm"].numpy(), rec.stats["guidance_scale"].numpy()[:, 0]
    skipped = np.isin(scale, [0, 1])
    assert np.isnan(delta[skipped]).all() and np.isfinite(delta[~skipped]).all() and (delta[~skipped] > 0).all()
    # the plotted lines: NaN (a gap) at guidance 0 and 1, values at 7.5
    lines = registry.create("visualizers", "stats_plot").series(rec)["guidance_delta_norm"]
    assert set(lines) == {"w=0", "w=1", "w=7.5"}
    assert np.isnan(lines["w=0"][1]).all() and np.isnan(lines["w=1"][1]).all()
    assert np.isfinite(lines["w=7.5"][1]).all()
    assert (tmp_path / "stats_plot.png").is_file()


def test_grid_shows_every_line_of_a_column_label():
    """A guider at two scales gets columns "cfg\\nw=3" and "cfg\\nw=7.5": the header grows to hold both lines
    (it used to keep one line's height, so the second line was drawn under the images)."""
    from stablefused.outputs import grid

    cells = [Image.new("RGB", (48, 48), "white")] * 2
    one, two = grid(cells, 1, 2, col_labels=["cfg", "cfg"]), grid(cells, 1, 2, col_labels=["cfg\nw=3", "cfg\nw=7.5"])
    top_one, top_two = one.height - 192, two.height - 192  # cells are upscaled to 192 px
    assert top_two > top_one
    ink = (np.asarray(two.convert("L"))[:top_two] < 128).any(axis=1)  # header rows with text in them
    bands = int(ink[0]) + int(np.sum(ink[1:] & ~ink[:-1]))  # separate runs of inked rows: one per line
    assert bands == 2
