"""`python -m stablefused -m ...` sweeps on the tiny model: the same PNGs under the basic, joblib and
submitit_local launchers (real worker processes), every job runs when one fails, the sweep's exit code and
report name the failure, and the report's files."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stablefused import report

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny_random", "logger=none", "progress=false", "steps=2", "seeds=[0]", "metrics=[shapes_adherence]"]
GUIDANCE = "guidance_scales=[0],[3],[7.5]"


def sweep(sweep_dir: Path, *args: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "stablefused", "-m", *BASE, *args, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, env=env, timeout=300)


def pngs(sweep_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sweep_dir)): p.read_bytes() for p in sorted(sweep_dir.glob("*/images/*.png"))}


def statuses(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/status.json"))}


def model_loads(sweep_dir: Path) -> int:
    return sum(p.read_text().count("Loaded model tiny_random") for p in sweep_dir.glob("*/*.log"))


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    d = tmp_path_factory.mktemp("basic")
    res = sweep(d, GUIDANCE)
    assert res.returncode == 0, res.stderr[-3000:]
    return d


def test_basic_sweep_report(basic):
    assert len(pngs(basic)) == 3 * 2  # 3 jobs x 2 example prompts
    st = statuses(basic)
    assert [s["status"] for s in st.values()] == ["ok"] * 3 and len({s["pid"] for s in st.values()}) == 1
    assert all(s["unet_rows"] > 0 and s["images"] == 2 and s["wall_s"] > 0 for s in st.values())
    assert model_loads(basic) == 1  # one process: the model is loaded once and shared by the jobs
    with open(basic / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["guidance_scales"] for r in rows] == ["[0]", "[3]", "[7.5]"]
    assert {"status", "images", "wall_s", "unet_rows", "overrides", "shapes_adherence/mean"} <= set(rows[0])
    assert all(r["status"] == "ok" and r["images"] == "2" for r in rows)
    # guidance 0 runs only the unconditional pass: half the UNet rows of the others
    assert int(rows[0]["unet_rows"]) * 2 == int(rows[1]["unet_rows"]) == int(rows[2]["unet_rows"])
    assert 0 <= float(rows[0]["shapes_adherence/mean"]) <= 1
    for k, row in zip("012", rows):  # the manifest ends with the run's record; the report reads compute from it
        last = json.loads((basic / k / "manifest.jsonl").read_text().splitlines()[-1])
        assert last["type"] == "run" and last["images"] == 2 and last["kept"] == 0 and last["wall_s"] > 0
        assert (last["unet_rows"], last["model_calls"]) == (int(row["unet_rows"]), int(row["model_calls"]))
    assert (basic / "report_grid.png").is_file()
    assert (basic / "plots" / "shapes_adherence_mean_vs_guidance_scales.png").is_file()
    md = (basic / "report.md").read_text()
    assert "3 jobs, 3 ok, 0 failed" in md and "report_grid.png" in md


def test_rerun_of_a_finished_sweep_skips_every_job(basic, tmp_path):
    import shutil

    d = tmp_path / "sweep"
    shutil.copytree(basic, d)
    before = {p: p.stat().st_mtime_ns for p in d.glob("*/images/*.png")}
    res = sweep(d, GUIDANCE, "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert all(f"{d / k} is complete" in log for k in "012") and "Loaded model" not in log
    assert {p: p.stat().st_mtime_ns for p in d.glob("*/images/*.png")} == before  # nothing made again
    assert statuses(d) == statuses(basic)


def test_failed_job_does_not_stop_the_sweep(tmp_path, capsys):
    res = sweep(tmp_path, "height=16,18,20")  # 18 is not a multiple of tiny_random's size_multiple (4)
    assert res.returncode == 1
    st = statuses(tmp_path)
    assert [st[k]["status"] for k in "012"] == ["ok", "failed", "ok"]  # job 2 ran after job 1 failed
    assert st["1"]["reason"] == "height=18: must be a multiple of 4 for model tiny_random; use 16 or 20"
    assert st["1"]["error_type"] == "ConfigError"
    assert len(pngs(tmp_path)) == 2 * 2
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 2  # the job's own line, then the sweep's summary naming it
    assert "job 1 failed: height=18" in errors[0]
    assert "1 of 3 sweep jobs failed: #1 (height=18)" in errors[1]
    assert "Traceback" not in res.stderr
    md = (tmp_path / "report.md").read_text()
    assert "3 jobs, 2 ok, 1 failed" in md and "- #1 (height=18): failed: height=18: must be" in md
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["height"], r["status"]) for r in rows] == [("16", "ok"), ("18", "failed"), ("20", "ok")]
    # `python -m stablefused report DIR` rebuilds the same report and exits 1 as a failed sweep does
    (tmp_path / "summary.csv").unlink()
    assert report.main([str(tmp_path)]) == 1
    assert "#1 (height=18)" in capsys.readouterr().out and (tmp_path / "summary.csv").is_file()


RAY_LOCAL = ["+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"]


@pytest.mark.parametrize("launcher, module, extra", [
    ("joblib", "hydra_joblib_launcher", []),
    pytest.param("submitit_local", "hydra_submitit_launcher", []),
    # a local Ray cluster (~70 s here); hydra-ray-launcher pins cloudpickle<3, see README
    pytest.param("ray", "hydra_ray_launcher", RAY_LOCAL, marks=pytest.mark.slow),
])
def test_launcher_gives_the_basic_launchers_pngs(basic, tmp_path, launcher, module, extra):
    if importlib.util.find_spec(f"hydra_plugins.{module}") is None:
        pytest.skip(f"{module} not installed")
    res = sweep(tmp_path, GUIDANCE, f"hydra/launcher={launcher}", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    ours, ref = pngs(tmp_path), pngs(basic)
    assert sorted(ours) == sorted(ref) and len(ours) == 6
    assert all(ours[k] == ref[k] for k in ref)  # byte-identical
    st = statuses(tmp_path)
    pids = {s["pid"] for s in st.values()}
    assert [s["status"] for s in st.values()] == ["ok"] * 3
    # each worker process loads the model once: submitit_local runs one process per job, joblib's loky
    # workers and Ray's workers are reused across jobs
    assert model_loads(tmp_path) == len(pids)
    if launcher == "submitit_local":
        assert len(pids) == 3
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_missing_launcher_plugin_is_one_line(monkeypatch, capsys):
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None:
        pytest.skip("hydra-ray-launcher is installed")
    from stablefused import app

    monkeypatch.setattr(sys, "argv", ["stablefused", "-m", "hydra/launcher=ray", "seeds=[0],[1]"])
    with pytest.raises(SystemExit) as e:
        app.main()
    assert e.value.code == 2
    assert capsys.readouterr().err == ("hydra/launcher=ray: the hydra-ray-launcher plugin is not installed; "
                                       "pip install -e '.[ray]' (or pip install hydra-ray-launcher)\n")

def test_a_failing_report_still_fails_the_sweep(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from stablefused.sweeps import SweepReport

    def broken(sweep_dir):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(SystemExit) as e:  # Hydra would turn an exception here into a warning and exit 0
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert e.value.code == 1
    assert "sweep report for" in capsys.readouterr().err


def test_report_logged_to_wandb_in_the_sweeps_group(basic, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from stablefused.sweeps import log_to_wandb
    from tests.test_app import read_wandb

    d = tmp_path / "sweep"
    shutil.copytree(basic, d)
    groups = {s["group"] for s in statuses(d).values()}
    assert len(groups) == 1 and None not in groups  # the group the jobs' W&B runs would have used
    log_to_wandb(OmegaConf.create({"name": "wandb", "project": "stablefused", "mode": "offline"}), d,
                 report.collect(d))
    (records,) = read_wandb(d)
    info = next(r for r in records if r["type"] == "run")["run"]
    assert (info.get("jobType") or info.get("job_type")) == "sweep_report"
    assert (info.get("runGroup") or info.get("run_group")) == groups.pop()
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert any("media/table/sweep_summary" in f for f in files)
    assert any("media/images/report_grid" in f for f in files)
    assert any("shapes_adherence_mean_vs_guidance_scales" in f for f in files)


# ------------------------------------------------------------------------------------------- resume
RESUME = ["steps=4", "batch_size=2", "prompts=[a red circle]", "seeds=[" + ",".join(map(str, range(24))) + "]",
          "recorders=[x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.panels=[x0]"]  # step records and a video must survive the kill too


def images_per_index(job_dir: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in (job_dir / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "image":
            counts[rec["index"]] = counts.get(rec["index"], 0) + 1
    return counts


# three sweeps of 72 images each (~35 s here): in the default run, the sweeps issue asks for it
def test_killed_sweep_resumes_to_the_same_pngs(tmp_path):
    import signal
    import time

    ref, d = tmp_path / "ref", tmp_path / "sweep"
    res = sweep(ref, GUIDANCE, *RESUME)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "stablefused", "-m", *BASE, GUIDANCE, *RESUME,
                             f"hydra.sweep.dir={d}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill when job 1 has a few images
        m = d / "1" / "manifest.jsonl"
        if m.is_file() and m.read_text().count('"type": "image"') >= 4:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a scheduler's kill does
    proc.wait()
    killed = statuses(d)
    assert killed["0"]["status"] == "ok" and killed["1"]["status"] == "running" and "2" not in killed
    made = images_per_index(d / "1")
    assert 4 <= len(made) < 24  # job 1 was stopped midway

    res = sweep(d, GUIDANCE, *RESUME, "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert f"{d / '0'} is complete" in log and f"{d / '1'} is complete" not in log  # job 0 skipped
    assert "resuming: %d of 24 images already in %s" % (len(made), d / "1") in log
    assert model_loads(d) == 2  # the killed process and the rerun (job 0 did not load it again)
    ours, theirs = pngs(d), pngs(ref)
    assert sorted(ours) == sorted(theirs) and len(ours) == 72
    assert all(ours[k] == theirs[k] for k in theirs)  # every PNG byte-identical with the uninterrupted sweep
    for name in ("grid.png", "report_grid.png", "records.json"):
        for a in sorted(ref.glob(f"**/{name}")):
            assert (d / a.relative_to(ref)).read_bytes() == a.read_bytes(), a
    from safetensors.torch import load_file

    from tests.test_visualizers import frames_of

    for job in "012":  # the step records and the video of the killed job equal the uninterrupted one's
        a, b = (load_file(str(x / job / "records.safetensors")) for x in (ref, d))
        assert sorted(a) == ["x0"] == sorted(b) and a["x0"].shape[0] == 24 and bool((a["x0"] == b["x0"]).all())
        assert np.array_equal(frames_of(ref / job / "denoise.mp4"), frames_of(d / job / "denoise.mp4"))
    for job in "012":
        assert images_per_index(d / job) == {i: 1 for i in range(24)}  # no duplicate manifest lines
        runs = [json.loads(x) for x in (d / job / "manifest.jsonl").read_text().splitlines()
                if json.loads(x)["type"] == "run"]
        assert len(runs) == 1 and runs[0]["images"] == 24
    # job 1's run record counts only the images the rerun made
    run1 = json.loads((d / "1" / "manifest.jsonl").read_text().splitlines()[-1])
    assert run1["kept"] == len(made) and run1["model_calls"] == 4 * (24 - len(made)) // 2 + 4 * ((24 - len(made)) % 2)
    st = statuses(d)
    assert [s["status"] for s in st.values()] == ["ok"] * 3
    assert st["0"] == killed["0"]  # the skipped job's status.json is left as it was
    md = (d / "report.md").read_text()
    assert "3 jobs, 3 ok, 0 failed" in md
    with open(d / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["images"] for r in rows] == ["24"] * 3
    assert int(rows[1]["model_calls"]) == run1["model_calls"] and rows[0]["model_calls"] == "48"


# ------------------------------------------------------------------------------------------- X/Y/Z plot
def test_xyz_plot_batches_x_and_makes_one_grid_per_z(tmp_path):
    import numpy as np
    from PIL import Image

    res = sweep(tmp_path, "experiment=xyz", "xyz.y=scheduler", "xyz.z=steps", "guidance_scales=[0,5]",
                "scheduler=ddim,euler", "steps=2,3")
    assert res.returncode == 0, res.stderr[-3000:]
    st = statuses(tmp_path)
    assert len(st) == 4  # 2 schedulers x 2 step counts; the 2 guidance scales share each job's batch
    assert all(len(list((tmp_path / j / "images").glob("*.png"))) == 2 for j in st)
    assert sorted(p.name for p in tmp_path.glob("xyz*.png")) == ["xyz_2.png", "xyz_3.png"]
    job = {(j.values()["scheduler"], j.values()["steps"]): j.dir for j in report.collect(tmp_path)}
    for steps in (2, 3):
        g = np.asarray(Image.open(tmp_path / f"xyz_{steps}.png").convert("RGB"))
        cell = 16 * 12  # tiny_random's 16 px upscaled to the grid's 192 px cells
        top, left = g.shape[0] - 2 * cell, g.shape[1] - 2 * cell  # 2 rows (schedulers) x 2 columns (guidance)
        assert top > 0 and left > 0  # room for the labels
        for r, sched in enumerate(("ddim", "euler")):
            d = job[(sched, str(steps))]
            recs = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
            for c, scale in enumerate((0.0, 5.0)):
                (rec,) = [x for x in recs if x["type"] == "image" and x["guidance_scale"] == scale]
                want = np.asarray(Image.open(d / rec["path"]).convert("RGB").resize((cell, cell), Image.NEAREST))
                got = g[top + r * cell: top + (r + 1) * cell, left + c * cell: left + (c + 1) * cell]
                assert np.array_equal(got, want), (steps, sched, scale)
    md = (tmp_path / "report.md").read_text()
    assert "![xyz_2](xyz_2.png)" in md and "![xyz_3](xyz_3.png)" in md


def test_xyz_axis_typo_is_one_line(tmp_path):
    res = sweep(tmp_path, "experiment=xyz", "xyz.y=schedular", "scheduler=ddim,euler")
    assert res.returncode == 1
    errors = [x for x in (res.stdout + res.stderr).splitlines() if "ERROR" in x and "job 0" in x]
    assert errors and errors[0].endswith("xyz.y=schedular: no such setting; did you mean scheduler?")


# ------------------------------------------------------------------------------------------- every task's outputs
def test_report_of_a_sweep_of_walks_counts_frames_and_videos(tmp_path):
    """A walk's outputs are frames and a video, not images: the report counts them, averages the metrics over
    the frames and shows frames in the report grid (there is no grid.png)."""
    res = sweep(tmp_path, "task=walk", "prompts=[a red circle,a blue square]", "segment_frames=2,3")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["segment_frames"] for r in rows] == ["2", "3"]  # the swept setting
    assert [r["frame_pngs"] for r in rows] == ["3", "4"] and [r["videos"] for r in rows] == ["1", "1"]
    assert all(r["shapes_adherence/mean"] not in ("", None) for r in rows)  # scored frames, averaged
    assert "position" not in rows[0] and "time" not in rows[0]  # a frame's place in the walk is not a metric
    assert (tmp_path / "report_grid.png").is_file()
    md = (tmp_path / "report.md").read_text()
    assert "| frame_pngs | videos |" in md and "report_grid.png" in md
    res = subprocess.run([sys.executable, "-m", "stablefused", "report", str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0 and "2/2 jobs ok" in res.stdout, res.stderr[-2000:]
