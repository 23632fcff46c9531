"""walker=zoom: keyframes outpainted from the one before (the kept part exact), crops between them that start
and end on the keyframes, zoom in = the zoom-out frames reversed, pan, smooth motion, resume, bad settings."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablefused.app import run
from stablefused.config import validate
from stablefused.errors import ConfigError
from tests.conftest import compose_cfg

PROMPTS = "prompts=[a red circle,a blue square on black,a small green triangle]"
BASE = ["task=walk", "walker=zoom", "steps=3", "segment_frames=4", PROMPTS, "seeds=[1,2,3]", "walker.mask_blur=0"]


def frames(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "manifest.jsonl").read_text().splitlines()]
    return [np.asarray(Image.open(Path(run_dir) / r["path"]).convert("RGB"))
            for r in sorted((r for r in recs if r["type"] == "frame"), key=lambda r: r["index"])]


def keyframes(run_dir):
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((Path(run_dir) / "zoom").glob("keyframe_*.png"))]


@pytest.fixture(scope="module")
def zoom_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoom") / "out"
    r = run(compose_cfg(*BASE), out)
    return out, r


def test_keyframes_are_outpainted_and_frames_start_on_them(zoom_out):
    out, r = zoom_out
    ks, fs = keyframes(out), frames(out)
    assert len(ks) == 3 and len(fs) == 2 * 4 + 1
    for j in range(2):
        # keyframe j+1's middle 8x8 (of 16) is keyframe j shrunk, exactly (paste-back), its border repainted
        small = np.asarray(Image.fromarray(ks[j]).resize((8, 8), Image.LANCZOS))
        assert np.array_equal(ks[j + 1][4:12, 4:12], small)
        border = np.ones((16, 16), bool)
        border[4:12, 4:12] = False
        assert np.abs(ks[j + 1][border].astype(float) - ks[j][border]).mean() > 5
    assert np.array_equal(fs[0], ks[0]) and np.array_equal(fs[4], ks[1]) and np.array_equal(fs[8], ks[2])
    assert r.stats["unet_rows"] == 3 * 3 * 2  # 3 keyframes x 3 steps x [uncond, cond]; crops cost no UNet call
    import imageio.v2 as iio

    with iio.get_reader(str(out / "walk.mp4"), format="FFMPEG") as reader:
        assert sum(1 for _ in reader) == 9


def test_motion_is_smooth(zoom_out):
    """Consecutive frames change about equally (no jump where keyframes join), and far less than the jump
    from keyframe to keyframe."""
    out, _ = zoom_out
    a = np.stack(frames(out)).astype(float) / 255
    d = np.sqrt(((a[1:] - a[:-1]) ** 2).reshape(len(a) - 1, -1).mean(1))
    k = np.stack(keyframes(out)).astype(float) / 255
    jump = np.sqrt(((k[1:] - k[:-1]) ** 2).reshape(2, -1).mean(1))
    assert d.max() < 2.5 * np.median(d) and d.max() < jump.min()


def test_zoom_in_is_the_zoom_out_reversed(zoom_out, tmp_path):
    out, _ = zoom_out
    run(compose_cfg(*BASE, "walker.direction=in"), tmp_path)
    a, b = frames(out), frames(tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(a, reversed(b)))


def test_pan_shifts_and_paints_the_strip(tmp_path):
    run(compose_cfg(*BASE, "walker.mode=pan", "walker.direction=right", "walker.shift=0.25"), tmp_path)
    ks, fs = keyframes(tmp_path), frames(tmp_path)
    for j in range(2):
        assert np.array_equal(ks[j + 1][:, :12], ks[j][:, 4:])  # moved 4 px left, exactly
    assert np.array_equal(fs[4], ks[1])
    # halfway through the first segment the view has moved 2 px
    assert np.abs(fs[2][:, :12].astype(float) - ks[0][:, 2:14]).mean() < 3


def test_resumed_zoom_gives_the_same_frames(zoom_out, tmp_path):
    out, _ = zoom_out
    import shutil

    shutil.copytree(out, tmp_path / "cut")
    for p in sorted((tmp_path / "cut" / "frames").glob("*.png"))[5:]:
        p.unlink()
    (tmp_path / "cut" / "zoom" / "keyframe_002.png").unlink()
    run(compose_cfg(*BASE), tmp_path / "cut")
    assert all(np.array_equal(x, y) for x, y in zip(frames(out), frames(tmp_path / "cut")))
    # a keyframe file another config left behind (not listed in this run's manifest) is not reused
    (tmp_path / "other" / "zoom").mkdir(parents=True)
    shutil.copy(out / "zoom" / "keyframe_000.png", tmp_path / "other" / "zoom" / "keyframe_000.png")
    run(compose_cfg(*BASE[:-2], "seeds=[4,5,6]", "walker.mask_blur=0"), tmp_path / "other")
    assert not np.array_equal(keyframes(tmp_path / "other")[0], keyframes(out)[0])


def test_inpainting_model_zooms(tmp_path):
    """A 9-channel inpainting UNet (model.path=) paints the border through its extra channels."""
    from tests.test_inpaint import build_tiny_inpainting

    from stablefused.models import save_components

    folder = save_components(build_tiny_inpainting(), tmp_path / "inpainting")
    run(compose_cfg(*BASE[:-3], "segment_frames=2", "prompts=[a red circle,a blue square on black]", "seeds=[1,2]",
                    "walker.mask_blur=0", f"model.path={folder}", "model.name=tiny_inpainting"), tmp_path / "run")
    ks = keyframes(tmp_path / "run")
    small = np.asarray(Image.fromarray(ks[0]).resize((8, 8), Image.LANCZOS))
    assert len(ks) == 2 and np.array_equal(ks[1][4:12, 4:12], small)


@pytest.mark.parametrize("overrides,needle", [
    (["loop=true"], "loop=true: walker=zoom cannot return"),
    (["pacing=even"], "pacing=even: walker=zoom sets its own pacing"),
    (["walker.factor=0.95"], "factor=0.95"),
    (["walker.direction=left"], "walker.direction='left'"),
    (["recorders=[x0]"], "recorders: walker=zoom makes its frames without the denoising loop"),
])
def test_bad_settings(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*BASE, *overrides))
    assert needle in str(e.value)


def test_experiment_composes():
    cfg = compose_cfg("experiment=zoom_walk", "model=shapes")
    validate(cfg)
    assert cfg.task == "walk" and cfg.walker.name == "zoom"
