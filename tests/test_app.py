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


@pytest.mark.parametrize("scheduler, label", [
    ("euler_ancestral", "Euler a"), ("dpm_multistep_karras", "DPM++ 2M Karras"), ("default", "DDIM"),
])
def test_png_parameters_name_the_sampler(tmp_path, scheduler, label):
    run(compose_cfg("seeds=[0]", "steps=2", "guidance_scales=[7.5]", "prompts=[a red circle]",
                    f"scheduler={scheduler}"), tmp_path)
    (png,) = (tmp_path / "images").glob("*.png")
    assert f"Sampler: {label}," in read_parameters(png)


def test_sampler_label_from_scheduler_class_and_config():
    from stablefused.scheduler_names import sampler_label

    assert sampler_label("EulerAncestralDiscreteScheduler") == "Euler a"
    assert sampler_label("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}) == "DPM++ 2M Karras"
    assert sampler_label("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}) == "DPM++ 2M SDE"
    assert sampler_label("PNDMScheduler", {"skip_prk_steps": True}) == "PLMS"
    assert sampler_label("KDPM2AncestralDiscreteScheduler") == "DPM2 a"
    assert sampler_label("FlowMatchEulerDiscreteScheduler") == "Flow Euler"


def test_every_scheduler_config_label_matches_its_scheduler(tiny):
    from omegaconf import OmegaConf

    from stablefused.paths import config_dir
    from stablefused.scheduler_names import sampler_label

    for path in sorted((config_dir() / "scheduler").glob("*.yaml")):
        c = OmegaConf.load(path)
        if c.name == "default":
            assert not c.get("label")  # derived from the model's scheduler
            continue
        sched = tiny.make_scheduler(c.cls, **(c.overrides or {}))
        assert c.label == sampler_label(sched), path.name


def test_run_log_has_no_library_chatter(tmp_path):
    """The bundled model, loaded from its folder like any checkpoint: no `accelerate` warning, no weights
    progress bar (``progress=false`` turns ours off too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    res = subprocess.run([sys.executable, "-m", "stablefused", "seeds=[0]", "steps=1", "logger=none",
                          "progress=false", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                         env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "accelerate" not in out.lower()
    assert not any(s in out for s in ("it/s]", "%|", "Loading weights")), out[-2000:]
    assert "Loaded model shapes" in out  # our own log still shows


def test_accelerate_is_a_dependency():
    import tomllib

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "accelerate" for d in deps)


def test_offline_wandb_run_is_whole(tmp_path, monkeypatch):
    """Every file the offline run's records point to (the table's staged images and JSON) is inside the
    run dir, so copying the run dir and `wandb sync`-ing it elsewhere loses nothing; nothing goes to the
    user's W&B data dir, and the environment is as before afterwards."""
    outside = tmp_path / "home"
    outside.mkdir()
    monkeypatch.setenv("HOME", str(outside))
    monkeypatch.setenv("WANDB_DATA_DIR", str(outside / "wandb-data"))
    monkeypatch.delenv("WANDB_ARTIFACT_DIR", raising=False)
    run_dir = tmp_path / "run"
    run(compose_cfg("seeds=[0]", "steps=1", "guidance_scales=[7.5]", "logger=wandb"), run_dir)
    (records,) = read_wandb(run_dir)

    def paths(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and k in ("local_path", "localPath", "staging_dir", "stagingDir"):
                    yield v
                else:
                    yield from paths(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from paths(v)

    found = [p for r in records for p in paths(r)]
    assert any(r["type"] == "artifact" for r in records) and found  # the table was logged as an artifact
    for p in set(found):
        assert Path(p).resolve().is_relative_to(next((run_dir / "wandb").glob("offline-run-*")).resolve()), p
        assert Path(p).exists(), p
    assert not (outside / "wandb-data").exists()
    assert not (outside / ".local" / "share" / "wandb").exists()
    assert os.environ["WANDB_DATA_DIR"] == str(outside / "wandb-data") and "WANDB_ARTIFACT_DIR" not in os.environ


def test_help_lists_experiments_tasks_and_subcommands():
    res = cli("--help")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for text in ("experiment: ", "negative_guidance", "task: ", "img2img", "txt2img", "scheduler: ",
                 "python -m stablefused plugins", "python -m stablefused report", "stablefused -sc install=bash"):
        assert text in out, text
    assert "powered by Hydra" not in out


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint", "guidance_grid", "walk", "txt2video"])
def test_run_without_an_experiment_goes_to_runs_of_its_task(task):
    """`python -m stablefused task=<task>` writes runs/<task>/<timestamp>/ (an experiment names its own)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stablefused.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}"], return_hydra_config=True)
        exp = compose("config", overrides=[f"task={task}", "experiment=negative_guidance"])
    assert cfg.name == task
    assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"].startswith(f"runs/{task}/")
    assert OmegaConf.select(cfg, "hydra.sweep.dir").startswith(f"runs/{task}/multirun/")
    assert exp.name == "negative_guidance"
