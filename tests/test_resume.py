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
