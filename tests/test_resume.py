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
    return (["task=walk", "walker=story", f"story={f}", "walk_fps=2", "steps=2"], f,
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


# ------------------------------------------------------------------------------------------- point 2: overwrite
SMALL = ["prompts=[a red circle]", "seeds=[0,1]", "guidance_scales=[0,5]", "steps=2"]


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_never_empties_a_folder_it_did_not_write(tmp_path):
    """A user's folder that happens to hold a manifest.jsonl, images/ and run.json of its own: overwrite=true
    refuses in one line and removes nothing, whatever the files are called."""
    from stablefused.errors import ConfigError

    d = tmp_path / "mine"
    (d / "images").mkdir(parents=True)
    (d / "images" / "0000_r0_c0_s0.png").write_bytes(b"my holiday photo")
    (d / "photo.jpg").write_bytes(b"another photo")
    (d / "manifest.jsonl").write_text('{"type": "image", "index": 0, "path": "images/0000_r0_c0_s0.png"}\n'
                                      '{"type": "file", "path": "photo.jpg"}\n')
    (d / "run.json").write_text('{"config": {"my": "settings"}}')
    before = files_of(d)
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*SMALL, "overwrite=true"), d)
    assert "\n" not in str(e.value) and "overwrite=true" in str(e.value) and str(d) in str(e.value)
    assert files_of(d) == before


def test_overwrite_removes_only_what_the_previous_run_wrote(tmp_path):
    d = tmp_path / "run"
    run(compose_cfg(*SMALL, "recorders=[x0]"), d)
    (d / "notes.txt").write_text("my notes about this run")  # the user's own files in a run dir
    (d / "images" / "keep_me.png").write_bytes(b"not made by stablefused")
    run(compose_cfg(*SMALL[:2], "guidance_scales=[1,5]", SMALL[3], "overwrite=true"), d)
    assert (d / "notes.txt").read_text() == "my notes about this run"
    assert (d / "images" / "keep_me.png").read_bytes() == b"not made by stablefused"
    assert not (d / "records.safetensors").exists() and not (d / "records.parts").exists()
    assert len(list((d / "images").glob("0*.png"))) == 4


# ------------------------------------------------------------------------------------------- point 3: one owner
def test_a_second_live_run_into_the_same_dir_is_refused(tmp_path):
    d = tmp_path / "run"
    slow = ["prompts=[a red circle]", "seeds=[" + ",".join(map(str, range(400))) + "]", "steps=30", "batch_size=1"]
    proc = subprocess.Popen([sys.executable, "-m", "stablefused", *BASE, *slow, f"hydra.run.dir={d}"], env=ENV,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (d / "manifest.jsonl").is_file() or \
                '"type": "image"' not in (d / "manifest.jsonl").read_text():
            time.sleep(0.05)
        res = cli(*slow, f"hydra.run.dir={d}")
        lines = [x for x in (res.stdout + res.stderr).splitlines() if "ERROR" in x]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert str(d) in lines[0] and f"pid {proc.pid}" in lines[0], lines
        assert proc.poll() is None  # the owner runs on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # killed: its lock is stale (same host, dead pid): the next run takes it over
    from stablefused.runs import RunLock

    assert (d / RunLock.NAME).is_file()

    lock = RunLock(d)
    lock.acquire()  # a dead owner's lock is taken over, not an error
    lock.release()
    assert not (d / RunLock.NAME).exists()


def test_lock_of_a_requeued_cluster_job_is_taken_over(tmp_path, monkeypatch):
    """A SLURM job requeued on another host: same SLURM_JOB_ID, so the old lock is its own."""
    import json as _json

    from stablefused.runs import RunLock

    (tmp_path / RunLock.NAME).write_text(_json.dumps({"pid": 1, "host": "some-other-node", "started": "x",
                                                      "slurm_job_id": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "9999")  # another job's live lock on another host: refused
    (tmp_path / RunLock.NAME).write_text(_json.dumps({"pid": 1, "host": "some-other-node", "started": "x",
                                                      "slurm_job_id": "4242"}))
    from stablefused.errors import ConfigError

    with pytest.raises(ConfigError, match="some-other-node"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------------- point 4: decodes
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_makes_again_an_output_that_does_not_decode(tmp_path, damage):
    d = tmp_path / "run"
    run(compose_cfg(*SMALL), d)
    before = files_of(d / "images")
    name = sorted(before)[1]
    png = d / "images" / name
    png.write_bytes(png.read_bytes()[: len(before[name]) // 2] if damage == "truncated" else b"")
    again = run(compose_cfg(*SMALL), d)
    assert len(again.done) == 3  # the damaged one was made again, not kept
    assert files_of(d / "images") == before


def test_resumed_walk_makes_again_a_damaged_frame(tmp_path):
    overrides, _, _ = input_case(tmp_path, "story")
    d = tmp_path / "run"
    run(compose_cfg(*overrides), d)
    before = files_of(d / "frames")
    (d / "frames" / sorted(before)[1]).write_bytes(before[sorted(before)[1]][:40])
    again = run(compose_cfg(*overrides), d)
    assert len(again.done) == len(before) - 1
    assert files_of(d / "frames") == before


def test_lock_in_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    from stablefused.errors import ConfigError
    from stablefused.runs import RunLock

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*a_file/run: cannot write there \(Not a directory\)"):
        RunLock(tmp_path / "a_file" / "run").acquire()


def test_kill_between_a_batchs_manifest_lines_keeps_every_recorders_rows(tmp_path):
    """A kill inside a batch's manifest lines: the kept image's step records come from its batch's part (cut
    to it), the others are made again; every recorder's tensors equal an uninterrupted run's."""
    args = [*SMALL, "seeds=[0,1,2]", "batch_size=4", "recorders=[x0,stats,attention]"]
    run(compose_cfg(*args), tmp_path / "ref")
    d = tmp_path / "run"
    run(compose_cfg(*args), d)
    lines = (d / "manifest.jsonl").read_text().splitlines()
    cut = [i for i, x in enumerate(lines) if '"type": "image"' in x][4]  # batch 2 = images 4..5: keep image 4
    (d / "manifest.jsonl").write_text("\n".join(lines[: cut + 1]) + "\n")
    (d / "records.safetensors").unlink()
    again = run(compose_cfg(*args), d)
    assert len(again.done) == 5
    a, b = load_file(str(tmp_path / "ref" / "records.safetensors")), load_file(str(d / "records.safetensors"))
    assert sorted(a) == sorted(b) and all(torch_equal(a[k], b[k]) for k in a)
    again = run(compose_cfg(*args), d)  # and once more: no part holds a row twice
    assert len(again.done) == 6
    assert all(torch_equal(a[k], v) for k, v in load_file(str(d / "records.safetensors")).items())
