"""Issue 19, points 6-14 and 18: every bad input class is one line before the model loads (in process, one
or two representatives per class; benchmarks/bad_inputs.py runs 208 of them through the CLI)."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablefused import images as im
from stablefused.app import override_problems
from stablefused.config import literal_overrides, validate
from stablefused.errors import ConfigError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    return str(e.value).splitlines()


def ok(*overrides: str) -> None:
    validate(compose_cfg(*overrides))


def png_header_only(path: Path, w: int, h: int) -> Path:
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def noise(path: Path, w: int, h: int, **kw) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, **kw)
    return path


# ------------------------------------------------------------------------------------ 6. declared types
def test_every_setting_is_checked_against_its_declared_type_all_at_once():
    lines = problems("batch_size=[2]", "eta=abc", "guidance_scales=7.5", "negative_prompt=5", "height=[16]",
                     "threads=x", "progress=yes")
    assert len(lines) == 7, lines
    for key in ("batch_size", "eta", "guidance_scales", "negative_prompt", "height", "threads", "progress"):
        assert sum(x.startswith(f"{key}=") for x in lines) == 1, (key, lines)
    assert "guidance_scales=7.5: must be a list" in "\n".join(lines) and "e.g. guidance_scales=[7.5]" in "\n".join(lines)


def test_types_come_from_the_defaults_and_each_task_declares_the_rest():
    from stablefused.config import declared_types

    walk = declared_types("walk")
    assert walk["segment_frames"] is int and walk["loop"] is bool  # from conf/task/walk.yaml's defaults
    assert "strengths" not in walk and "strengths" in declared_types("img2img")
    lines = problems("task=walk", "walk_fps=[12]", "audio_duration=abc", "pacing=5")
    assert any(x.startswith("walk_fps=[12]: must be a number") for x in lines), lines
    assert any(x.startswith("audio_duration='abc'") for x in lines), lines
    assert not any("could not convert" in x for x in lines), lines  # no raw Python error after a type problem


def test_a_mapping_where_a_value_goes_is_one_line_before_hydra():
    assert override_problems(["plugin_dirs={a:1}"]) == ["plugin_dirs={a:1}: must be a string or a list or null"]
    assert override_problems(["logger.tags={a:1}"]) == ["logger.tags={a:1}: must be a list (each a string)"]
    out = override_problems(["seeds={a:1}", "width={a:1}"])
    assert len(out) == 2 and out[0].startswith("seeds={a:1}: must be a list") and out[1].startswith("width={a:1}: must be an integer")


def test_wandb_settings_checked_up_front():
    lines = problems("logger=wandb", "logger.tags=abc", "logger.mode=bogus", "logger.project=a/b", "logger.entity=''")
    text = "\n".join(lines)
    assert "logger.tags='abc': must be a list" in text and "logger.mode='bogus': must be one of online" in text
    assert "logger.project='a/b'" in text and "logger.entity=''" in text
    assert "W&B tags have 1 to 64" in "\n".join(problems("logger=wandb", "logger.tags=[" + "x" * 70 + "]"))


def test_online_without_credentials_stays_offline_with_one_line(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from stablefused.logger import resolve_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    mode, note = resolve_mode(OmegaConf.create({"mode": "online"}))
    assert mode == "offline" and note.startswith("logger.mode=online: no W&B credentials") and "\n" not in note
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(OmegaConf.create({"mode": "online"})) == ("online", None)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode(OmegaConf.create({"mode": "online"})) == ("online", None)


# ------------------------------------------------------------------------------------ 7. input files
def test_image_files_are_decoded_in_validation(tmp_path):
    src = noise(tmp_path / "n.jpg", 96, 96, quality=95)
    data = src.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])  # PIL's verify() passes this one
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    png_header_only(tmp_path / "bomb_warn.png", 12000, 12000)
    (tmp_path / "empty.png").write_bytes(b"")
    for name, what in [("trunc.jpg", "cannot read it as an image"), ("bomb.png", "decompression-bomb guard"),
                       ("bomb_warn.png", "decompression-bomb guard"), ("empty.png", "empty file")]:
        with pytest.raises(ConfigError, match=f"^init_image=.*{name}: .*{what}") as e:
            im.check(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_exif_orientation_is_the_same_in_validation_and_run(tmp_path):
    ex = Image.Exif()
    ex[0x0112] = 6  # shown rotated by 90 degrees: stored 64x32, shown 32x64
    noise(tmp_path / "r.jpg", 64, 32, exif=ex)
    (name, size), = im.check(str(tmp_path / "r.jpg"))
    (loaded,) = im.load(str(tmp_path / "r.jpg"))
    assert size == loaded.image.size == (32, 64)
    # a mask in the shown image's pixels: the right half of the stored image is outside the shown one
    lines = problems("task=inpaint", f"init_image={tmp_path / 'r.jpg'}", "mask=[rect:40,0,64,32]", "model=shapes")
    assert any(x.startswith("mask=") and "all black" in x for x in lines), lines
    ok("task=inpaint", f"init_image={tmp_path / 'r.jpg'}", "mask=[rect:0,40,32,64]", "model=shapes")


def test_truncated_mask_file_is_named(tmp_path):
    noise(tmp_path / "s.png", 32, 32)
    Image.new("L", (96, 96), 255).save(tmp_path / "m.png")
    data = (tmp_path / "m.png").read_bytes()
    (tmp_path / "m.png").write_bytes(data[: len(data) // 2])
    lines = problems("task=inpaint", f"init_image={tmp_path / 's.png'}", f"mask_image={tmp_path / 'm.png'}")
    assert lines == [next(x for x in lines if x.startswith("mask_image="))] and "cannot read it" in lines[0]


def write_story(path: Path, text: bytes) -> str:
    path.write_bytes(text)
    return str(path)


@pytest.mark.parametrize("text, fragment", [
    (b"1 | a red circle\n1 | caf\xe9\n", "line 2 is not UTF-8 text (byte 0xe9 at column 8)"),
    (b"1 | a red circle\ninf | a blue square\n", "line 2: seconds=inf must be a finite number > 0"),
    (b"nan | a red circle\n1 | a blue square\n", "line 1: seconds=nan must be a finite number > 0"),
    (b"1e9 | a red circle\n1 | a blue square\n", "frames in all, more than 100,000"),
    (b"1e-9 | a red circle\n1 | a blue square\n", "scene 1 ('a red circle') lasts 1e-09 s, less than one frame"),
    (bytes(range(256)), "line 1"),
], ids=["latin-1", "inf", "nan", "1e9 seconds", "sub-frame scene", "binary"])
def test_story_files_one_line(tmp_path, text, fragment):
    story = write_story(tmp_path / "s.txt", text)
    lines = problems("task=walk", "walker=story", f"story={story}", "walk_fps=2")
    assert len(lines) == 1 and lines[0].startswith("story=") and fragment in lines[0], lines


def test_story_with_bom_and_crlf_is_read(tmp_path):
    story = write_story(tmp_path / "s.txt", "1 | a red circle | one\r\n1 | a blue square | two\r\n".encode("utf-8-sig"))
    ok("task=walk", "walker=story", f"story={story}", "walk_fps=2")


def _wav(path: Path, seconds: float, rate: int = 8000) -> str:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.sin(np.arange(int(seconds * rate)) / 5) * 8000).astype("<i2").tobytes())
    return str(path)


def test_audio_is_decoded_and_long_enough_in_validation(tmp_path):
    pytest.importorskip("librosa")
    walk = ["task=walk", "walker=audio", "prompts=[a red circle,a blue square]", "seeds=[0,1]", "walk_fps=4"]
    (tmp_path / "t.wav").write_text("not audio")
    assert any(x.startswith(f"audio={tmp_path / 't.wav'}: cannot decode it as audio") for x in
               problems(*walk, f"audio={tmp_path / 't.wav'}"))
    one = _wav(tmp_path / "one.wav", 1.0)
    assert any(x.startswith("audio_start=5: past the end") for x in problems(*walk, f"audio={one}", "audio_start=5"))
    assert any(x.startswith("audio_duration=0.1: 0.1 s of audio is less than two frames") for x in
               problems(*walk, f"audio={one}", "audio_duration=0.1"))
    ok(*walk, f"audio={one}")


# ------------------------------------------------------------------------------------ 8. real output size
def test_max_pixels_and_minimum_size_apply_to_the_size_a_source_gives(tmp_path):
    noise(tmp_path / "big.png", 120, 120)
    noise(tmp_path / "tiny.png", 4, 4)
    lines = problems("task=img2img", "model=shapes", f"init_image={tmp_path / 'big.png'}", "max_pixels=5000",
                     "strengths=[1.0]", "seeds=[0]", "prompts=[a red circle]")
    assert lines == [next(x for x in lines if x.startswith("max_pixels=5,000: 1 output(s) per batch of 120x120"))]
    lines = problems("task=img2img", "model=shapes", f"init_image={tmp_path / 'tiny.png'}", "strengths=[1.0]")
    assert len(lines) == 1 and "gives 8x8 outputs, far below model shapes's 32x32" in lines[0], lines
    ok("task=img2img", "model=shapes", f"init_image={tmp_path / 'big.png'}", "strengths=[1.0]")


def test_video_frames_count_towards_max_pixels():
    lines = problems("task=txt2video", "height=16", "width=16", "video_frames=16", "max_pixels=2000")
    assert any("1 video(s) of 16 frames per batch of this size are 4,096 pixels" in x for x in lines), lines


# ------------------------------------------------------------------------------------ 9. literal prompts
@pytest.mark.parametrize("text", ["${steps}", "a ${oc.env:HOME} b", "${nosuch}", "cost $5 ${", "\\${steps}"])
def test_prompts_are_literal_text(text):
    args = literal_overrides([f"prompts=['{text}']", f"negative_prompt='{text}'", "steps=3"])
    cfg = compose_cfg(*args)
    assert list(cfg.prompts) == [text] and cfg.negative_prompt == text
    assert literal_overrides(["steps=${x}"]) == ["steps=${x}"]  # only the text settings


# ------------------------------------------------------------------------------------ 10. run dirs
def test_run_dir_problems_are_one_line_each(tmp_path):
    from stablefused.preflight import dir_problem

    (tmp_path / "f").write_text("x")
    assert dir_problem(str(tmp_path / "f"), "hydra.run.dir").endswith("is a file, not a folder; choose another "
                                                                     "hydra.run.dir")
    assert f"{tmp_path / 'f'} is a file" in dir_problem(str(tmp_path / "f" / "sub"), "hydra.run.dir")
    assert dir_problem("", "hydra.run.dir").startswith("hydra.run.dir='': empty")
    assert "cannot write in /proc" in dir_problem("/proc/stablefused_x", "hydra.run.dir")
    assert dir_problem(str(tmp_path / "new" / "run"), "hydra.run.dir") is None
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_full_disk_line_names_the_path_and_what_was_kept(tmp_path):
    from stablefused.preflight import disk_full_line

    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps({"type": "image", "path": f"images/{i}.png"}) + "\n"
                                                     for i in range(3)))
    line = disk_full_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "images" / "3.png")), tmp_path)
    assert line.startswith(f"{tmp_path / 'images' / '3.png'}: no space left on device; kept 3 complete output(s)")
    assert "\n" not in line


def test_cli_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    p = subprocess.run([sys.executable, "-m", "stablefused", "model=tiny_random", "logger=none",
                        f"hydra.run.dir={tmp_path / 'f'}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert p.returncode == 2 and (p.stdout + p.stderr).strip().splitlines() == [
        f"error: hydra.run.dir={tmp_path / 'f'}: is a file, not a folder; choose another hydra.run.dir"]


# ------------------------------------------------------------------------------------ 12. interrupts
def test_interrupt_during_model_load_is_one_line(monkeypatch, tmp_path, caplog):
    from stablefused import app, signals

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here
        raise AssertionError("not interrupted")

    monkeypatch.setattr(app, "load_components", load)
    with pytest.raises(signals.Interrupted) as e:
        app.run(compose_cfg("prompts=[a red circle]", "seeds=[0]"), tmp_path)
    assert e.value.exit_code == 130
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT) while starting (checks, model load)")


def test_interrupt_while_python_starts_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "stablefused", "model=tiny_random", "logger=none",
                             f"hydra.run.dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    time.sleep(0.3)  # importing torch
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and out.startswith("interrupted (SIGTERM)"), out


# ------------------------------------------------------------------------------------ 13. task settings
def test_a_task_setting_without_its_task_names_the_task():
    assert override_problems(["strengths=[0.3]"]) == [
        "strengths: a setting of task=img2img or task=inpaint, not of task=txt2img; add task=img2img or task=inpaint"]
    assert override_problems(["mask_blur=2"]) == [
        "mask_blur: a setting of task=inpaint, not of task=txt2img; add task=inpaint"]
    assert override_problems(["task=img2img", "loop=true"])[0].startswith("loop: a setting of task=walk, not of "
                                                                          "task=img2img")
    assert override_problems(["experiment=story_walk", "walk_fps=5"]) == []  # the experiment's task has it
    assert override_problems(["-m", "task=img2img", "strengths=[0.3],[0.6]"]) == []
    assert all("+" not in x for x in override_problems(["walker=story", "paste_back=false"]))


# ------------------------------------------------------------------------------------ 14. hub, offline
def test_offline_hub_loads_fail_fast_without_hf_hub_offline(monkeypatch):
    from stablefused import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: like a machine offline
    models.hub_reachable_once.cache_clear()
    try:
        t0 = time.perf_counter()
        lines = problems("model=sd15", "metrics=[clip_score]", "device=cuda") if not _cuda() else \
            problems("model=sd15", "metrics=[clip_score]")
        took = time.perf_counter() - t0
    finally:
        models.hub_reachable_once.cache_clear()
    text = "\n".join(lines)
    assert "model=sd15: stable-diffusion-v1-5/stable-diffusion-v1-5 is not downloaded and the hub " \
           "(http://127.0.0.1:9) cannot be reached" in text
    assert "metrics.clip_score.model_id='openai/clip-vit-base-patch32': CLIP weights not downloaded" in text
    assert took < 15


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------ 18. threads
def test_parallel_sweep_jobs_split_the_cores():
    from omegaconf import OmegaConf

    from stablefused.preflight import concurrent_jobs, job_threads

    assert job_threads(4, 2) == 1 and job_threads(2, 16) == 8 and job_threads(1, 4) == 4
    cfg = lambda target, **kw: OmegaConf.create({"hydra": {"launcher": {"_target_": target, **kw},  # noqa: E731
                                                           "overrides": {"task": ["seeds=[0],[1],[2],[3]", "steps=2"]}}})
    assert concurrent_jobs(cfg("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", n_jobs=-1)) \
        == min(4, len(os.sched_getaffinity(0)))
    assert concurrent_jobs(cfg("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", n_jobs=3)) == 3
    assert concurrent_jobs(cfg("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")) == 4
    assert concurrent_jobs(cfg("hydra._internal.core_plugins.basic_launcher.BasicLauncher")) == 1


def test_threads_setting_sets_torch_threads(tmp_path):
    import torch

    from stablefused import app

    before = torch.get_num_threads()
    try:
        app.run(compose_cfg("prompts=[a red circle]", "seeds=[0]", "steps=1", "threads=2"), tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert problems("threads=0") == ["threads=0: must be >= 1 (or null: torch's default)"]
