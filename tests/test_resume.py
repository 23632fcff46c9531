"""A run dir holds one run, whole: a run killed at any moment and run again ends with everything an
uninterrupted run makes (images, step records, videos); its inputs' content is part of its identity; it has
one owner at a time; ``overwrite=true`` removes only what a run wrote; kept outputs are checked to decode."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from stablefused.app import run
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
BASE = ["model=tiny_random", "logger=none", "progress=false"]
# the README's main job, small: recorders + denoise_video + stats_plot, 2 prompts x 6 seeds x 4 scales, one
# image per batch so that a kill lands between batches and inside them
MAIN = ["experiment=negative_guidance", "seeds=[0,1,2,3,4,5]", "steps=10", "guidance_scales=[-3,0,1,7.5]",
        "batch_size=1"]


def killed_run(run_dir: Path, args: list[str], after: int, kind: str = "image") -> int:
    """Start ``python -m stablefused args`` into run_dir and SIGKILL it once ``after`` outputs are in its
    manifest; returns how many there were."""
    proc = subprocess.Popen([sys.executable, "-m", "stablefused", *BASE, *args, f"hydra.run.dir={run_dir}"],
                            env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = run_dir / "manifest.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count(f'"type": "{kind}"') >= after:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return manifest.read_text().count(f'"type": "{kind}"')


def video_frames(path: Path) -> np.ndarray:
    from tests.test_visualizers import frames_of

    return np.stack(frames_of(path))


def test_killed_main_job_resumes_to_the_same_records_and_videos(tmp_path):
    ref, d = tmp_path / "ref", tmp_path / "resumed"
    run(compose_cfg(*MAIN), ref)
    made = killed_run(d, MAIN, after=12)
    assert 12 <= made < 48, made  # killed midway
    r = run(compose_cfg(*MAIN), d)  # raises if a visualizer failed (exit 2 on the command line)
    assert not r.failures and len(r.done) == made
    a, b = load_file(str(ref / "records.safetensors")), load_file(str(d / "records.safetensors"))
    assert sorted(a) == sorted(b) and all(torch_equal(a[k], b[k]) for k in a), "records differ"
    assert json.loads((ref / "records.json").read_text()) == json.loads((d / "records.json").read_text())
    assert np.array_equal(video_frames(ref / "denoise.mp4"), video_frames(d / "denoise.mp4"))
    assert (ref / "stats_plot.png").read_bytes() == (d / "stats_plot.png").read_bytes()
    for p in sorted((ref / "images").glob("*.png")):
        assert (d / "images" / p.name).read_bytes() == p.read_bytes()


def torch_equal(x, y) -> bool:
    import torch

    return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)))


# ------------------------------------------------------------------------------------------- point 1: inputs
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablefused", *BASE, *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def shape_png(path: Path, color: str = "red") -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (16, 16), "black")
    ImageDraw.Draw(img).ellipse([3, 3, 12, 12], fill=color)
    img.save(path)
    return path


def input_case(tmp_path: Path, kind: str) -> tuple[list[str], Path, callable]:
    """(overrides, the input file, a function that changes its content) for each input-file setting."""
    if kind == "init_image":
        f = shape_png(tmp_path / "src.png")
        return (["task=img2img", f"init_image={f}", "strengths=[0.5]", "steps=2", "seeds=[0]",
                 "prompts=[a blue square]"], f, lambda: shape_png(f, "green"))
    if kind == "mask_image":
        from PIL import Image

        src, f = shape_png(tmp_path / "src.png"), tmp_path / "mask.png"
        Image.new("L", (16, 16), 255).save(f)
        return (["task=inpaint", f"init_image={src}", f"mask_image={f}", "steps=2", "seeds=[0]",
                 "prompts=[a blue square]"], f, lambda: Image.new("L", (16, 16), 128).save(f))
    f = tmp_path / "story.txt"
    f.write_text("1 | a red circle | one\n1 | a blue square | two\n")
    return (["task=walk", "walker=story", f"story={f}", "fps=2", "steps=2"], f,
            lambda: f.write_text("1 | a red circle | one\n1 | a green triangle | two\n"))


@pytest.mark.parametrize("kind", ["init_image", "mask_image", "story"])
def test_changed_input_file_is_a_changed_run(tmp_path, kind):
    from stablefused.errors import ConfigError

    overrides, f, change = input_case(tmp_path, kind)
    d = tmp_path / "run"
    run(compose_cfg(*overrides), d)
    before = {p: p.read_bytes() for p in d.rglob("*.png")}
    run(compose_cfg(*overrides), d)  # same content: resumed (nothing to do), not refused
    change()
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*overrides), d)
    msg = str(e.value)
    assert "\n" not in msg and f"{kind}={f}" in msg and "changed" in msg, msg
    assert {p: p.read_bytes() for p in d.rglob("*.png")} == before  # nothing mixed in


def test_changed_input_file_is_not_complete_skipped_on_the_command_line(tmp_path):
    overrides, f, change = input_case(tmp_path, "init_image")
    d = tmp_path / "run"
    res = cli(*overrides, f"hydra.run.dir={d}")
    assert res.returncode == 0, res.stderr[-2000:]
    change()
    res = cli(*overrides, f"hydra.run.dir={d}")
    err = [x for x in (res.stdout + res.stderr).splitlines() if "ERROR" in x or "error" in x]
    assert res.returncode == 2 and "is complete" not in res.stdout + res.stderr
    assert len(err) == 1 and f"init_image={f}" in err[0], res.stderr[-2000:]
