"""`python -m stablefused experiment=negative_guidance` end to end on the tiny model: files, manifest, PNG
parameters, grid, reproducibility, W&B run read back, sweeps in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablefused.app import run
from stablefused.outputs import read_parameters
from tests.conftest import compose_cfg

WANDB = str(Path(sys.executable).parent / "wandb")
SMALL = ["experiment=negative_guidance", "seeds=[0,1]", "steps=4", "guidance_scales=[-3,0,1,7.5]"]


def cli(*args, cwd=None, env=None):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stablefused", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def read_wandb(run_dir: Path) -> list[dict]:
    """Records of the offline W&B run(s) under run_dir, via `wandb leet inspect --json`."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        res = subprocess.run([WANDB, "leet", "inspect", "--json", str(d)], capture_output=True, text=True, check=True)
        out.append([json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")])
    return out


def test_negative_guidance_writes_images_grid_manifest(tmp_path):
    r = run(compose_cfg(*SMALL), tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    images = [x for x in recs if x["type"] == "image"]
    assert len(images) == 2 * 2 * 4 == len(r.records)  # 2 prompts x 2 seeds x 4 scales
    required = {"path", "prompt", "negative_prompt", "seed", "guidance_scale", "steps", "scheduler", "model",
                "height", "width"}
    assert all(required <= set(x) for x in images)
    assert sorted({x["guidance_scale"] for x in images}) == [-3, 0, 1, 7.5]
    first = images[0]
    png = tmp_path / first["path"]
    assert not Path(first["path"]).is_absolute() and png.is_file()
    params = read_parameters(png)
    assert params.splitlines()[0] == first["prompt"]
    assert f"Seed: {first['seed']}" in params and "CFG scale: -3.0" in params and "Steps: 4" in params
    assert Image.open(png).size == (16, 16)
    grid = Image.open(tmp_path / "grid.png")
    # rows = prompt/seed (4), columns = guidance (4); tiny 16 px cells are upscaled for legible labels
    assert grid.width > 4 * 192 and grid.height > 4 * 192
    assert any(x["type"] == "grid" and x["path"] == "grid.png" for x in recs)
    # all cells went through the loop in shared batches: 16 images in 2 batches of 8
    assert r.stats["model_calls"] == 2 * 4
    # scale 0 and 1 rows need one pass each: 4 rows x (2+1+1+2) per step instead of 4 x 8
    assert r.stats["unet_rows"] == 4 * 4 * 6


def test_same_config_twice_gives_byte_identical_pngs(tmp_path):
    run(compose_cfg(*SMALL), tmp_path / "a")
    run(compose_cfg(*SMALL, "batch_size=3"), tmp_path / "b")
    a = sorted((tmp_path / "a" / "images").glob("*.png"))
    b = sorted((tmp_path / "b" / "images").glob("*.png"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 16
    same = [p.read_bytes() == q.read_bytes() for p, q in zip(a, b)]
    if not all(same):  # a different batch size may change float rounding; the pixels must still agree
        diff = max(np.abs(np.asarray(Image.open(p), int) - np.asarray(Image.open(q), int)).max() for p, q in zip(a, b))
        assert diff <= 1
    run(compose_cfg(*SMALL), tmp_path / "c")
    c = sorted((tmp_path / "c" / "images").glob("*.png"))
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, c))


def test_wandb_offline_run_has_config_images_and_table(tmp_path):
    run(compose_cfg(*SMALL, "logger=wandb"), tmp_path)
    (records,) = read_wandb(tmp_path)
    run_rec = next(r for r in records if r["type"] == "run")["run"]
    assert run_rec["jobType"] == "negative_guidance" if "jobType" in run_rec else run_rec["job_type"] == "negative_guidance"
    config = json.dumps(run_rec["config"])
    assert "guidance_scales" in config and "-3" in config
    history = [r["history"] for r in records if r["type"] == "history"]
    items = json.dumps(history)
    assert '"samples._type", "value_json": "\\"table-file\\""' in items or "table-file" in items
    assert "images._type" in items or '"images"' in items
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert sum("media/images/images_" in f for f in files) == 16
    assert any("media/table/samples" in f for f in files)
    assert any("media/images/grid" in f for f in files)


@pytest.mark.parametrize("args, message", [
    (["steps=0"], "steps=0: must be >= 1"),
    # offline without the CLIP weights: found by validation, before anything loads
    (["metrics=[clip_score]"], "metrics.clip_score.model_id='openai/clip-vit-base-patch32': CLIP weights not downloaded"),
])
def test_user_error_is_one_line_and_exit_code_2(tmp_path, args, message):
    res = cli("experiment=negative_guidance", "model=tiny_random", *args, f"hydra.run.dir={tmp_path}", "logger=none")
    assert res.returncode == 2
    errors = [line for line in res.stdout.splitlines() + res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "manifest.jsonl").exists()  # stopped before the model loaded


def test_sweep_loads_once_and_jobs_equal_solo_runs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["model=tiny_random", "experiment=negative_guidance", "seeds=[0]", "steps=3", "guidance_scales=[-2,5]",
            "progress=false"]
    res = cli("-m", *args, "scheduler=ddim,euler_ancestral,dpm_multistep", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (res.stdout + res.stderr).count("Loaded model tiny_random") == 1
    runs = [read_wandb(sweep / str(n))[0] for n in range(3)]
    infos = [next(r for r in recs if r["type"] == "run")["run"] for recs in runs]
    ids = {i.get("runId") or i.get("run_id") for i in infos}
    groups = {i.get("runGroup") or i.get("run_group") for i in infos}
    assert len(ids) == 3 and len(groups) == 1 and None not in groups
    solo = tmp_path / "solo"
    res = cli(*args, "scheduler=euler_ancestral", f"hydra.run.dir={solo}", "logger=none")
    assert res.returncode == 0, res.stderr[-2000:]
    job = sorted((sweep / "1" / "images").glob("*.png"))
    alone = sorted((solo / "images").glob("*.png"))
    assert len(job) == len(alone) == 4
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(job, alone))
    # the first job's scheduler did not leak: job 0 used DDIM, job 1 Euler ancestral
    m0 = json.loads((sweep / "0" / "manifest.jsonl").read_text().splitlines()[0])
    m1 = json.loads((sweep / "1" / "manifest.jsonl").read_text().splitlines()[0])
    assert (m0["scheduler_class"], m1["scheduler_class"]) == ("DDIMScheduler", "EulerAncestralDiscreteScheduler")
