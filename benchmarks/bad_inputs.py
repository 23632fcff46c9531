"""Issue 19's hostile-user list: 150+ bad inputs (none of them among the 98 in tests/test_validation.py), each
run through the real CLI (``python -m stablefused ...``, one subprocess each, bundled shapes model, steps=4)
and classified by what the user sees:

    clear       exits non-zero (or, for a warning case, runs) with one line per problem naming the setting
    misleading  the line does not name the setting, or gives advice that does not work (Hydra's "+key")
    multi-line  the right message, but buried in more lines than there are problems
    traceback   a Python traceback (or Hydra's "Error executing job" dump)
    silent      exits 0 although the input cannot be right (or the run does something else than asked)
    loss        something the run had made is missing / does not decode afterwards
    hang        still running after the case's time limit (killed)

    OMP_NUM_THREADS=1 python benchmarks/bad_inputs.py                     # every case, table on stdout
    OMP_NUM_THREADS=1 python benchmarks/bad_inputs.py --only story --show  # cases whose id contains 'story'
    python benchmarks/bad_inputs.py --out benchmarks/results/bad_inputs_after.md

Needs root for the two mount cases (a tmpfs full disk, a read-only bind mount); they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import wave
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=shapes", "steps=4", "seeds=[0]", "logger=none", "progress=false"]
CLASSES = ["clear", "misleading", "multi-line", "traceback", "silent", "loss", "hang"]


@dataclass
class Case:
    id: str
    point: str  # the point (6..14) it probes
    args: list[str]
    expect: list[str] = field(default_factory=list)  # fragments the one error line must contain
    kind: str = "error"  # error | ok (must run, e.g. a literal prompt) | warn (runs, with one line) | interrupt
    lines: int = 1  # problems the input has (error lines allowed)
    env: dict = field(default_factory=dict)  # None value: unset
    signal_at: tuple[float, int] | None = None  # (seconds, signal) for interrupts
    check: Callable[[Path, str], str | None] | None = None  # after the run: None or what is wrong
    setup: Callable[[Path], None] | None = None
    teardown: Callable[[Path], None] | None = None
    timeout: float = 45.0
    base: bool = True


# ----------------------------------------------------------------------------------------- fixtures
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that claims w x h (8-bit RGB) with one tiny IDAT: cheap to make, a bomb to decode."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))


def wav(path: Path, seconds: float, rate: int = 22050) -> None:
    import numpy as np

    n = int(seconds * rate)
    t = np.arange(n) / rate
    y = (0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((y * 32767).astype("<i2").tobytes())


def make_fixtures(d: Path) -> None:
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    noise(32, 32).save(d / "good.png")
    noise(120, 120).save(d / "src120.png")
    noise(4, 4).save(d / "tiny4.png")
    noise(2, 300).save(d / "sliver.png")
    noise(48, 32).save(d / "wide.png")
    big = noise(96, 96)
    big.save(d / "noise96.png")
    raw = (d / "noise96.png").read_bytes()
    (d / "trunc.png").write_bytes(raw[: len(raw) // 2])
    big.save(d / "noise96.jpg", quality=95)
    raw = (d / "noise96.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image\n")
    png_header_only(d / "bomb.png", 20000, 20000)  # 400 Mpx: PIL refuses above 179 Mpx
    png_header_only(d / "bomb_warn.png", 12000, 12000)  # 144 Mpx: PIL only warns (89..179 Mpx), decodes 432 MB
    png_header_only(d / "huge_ok_header.png", 5000, 5000)  # 25 Mpx claimed, data missing: truncated
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 64x32 -> shown 32x64
    ex = Image.Exif()
    ex[0x0112] = 6
    noise(64, 32).save(d / "exif6.jpg", exif=ex, quality=95)
    # a folder with one bad image among good ones; an empty folder; a folder of text files
    (d / "mixed").mkdir(exist_ok=True)
    noise(32, 32).save(d / "mixed" / "a.png")
    (d / "mixed" / "b.png").write_bytes(raw[:100])
    (d / "emptydir").mkdir(exist_ok=True)
    (d / "txtdir").mkdir(exist_ok=True)
    (d / "txtdir" / "x.txt").write_text("x")
    # masks
    Image.new("L", (32, 32), 255).save(d / "mask_white.png")
    m = Image.new("L", (96, 96), 0)
    m.paste(255, (0, 0, 48, 96))
    m.save(d / "mask96.png")
    raw = (d / "mask96.png").read_bytes()
    (d / "mask_trunc.png").write_bytes(raw[: len(raw) // 2])
    (d / "mask_empty.png").write_bytes(b"")
    (d / "mask_text.png").write_text("mask")
    png_header_only(d / "mask_bomb.png", 20000, 20000)
    # audio
    wav(d / "one_second.wav", 1.0)
    wav(d / "blip.wav", 0.01)
    wav(d / "silent0.wav", 0.0)
    (d / "text.wav").write_text("RIFF but not really\n")
    (d / "noise.mp3").write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    (d / "adir.wav").mkdir(exist_ok=True)
    # stories
    story = lambda name, text, enc="utf-8": (d / name).write_bytes(text.encode(enc))  # noqa: E731
    story("latin1.txt", "1 | a red circle on a black background | start\n1 | a blue square | caf\xe9\n", "latin-1")
    story("nan.txt", "nan | a red circle on a black background\n1 | a blue square\n")
    story("inf.txt", "1 | a red circle on a black background\ninf | a blue square\n")
    story("huge.txt", "1e9 | a red circle on a black background\n1 | a blue square\n")
    story("many.txt", "".join(f"600 | a red circle on a black background | scene {i}\n" for i in range(3000)))
    story("bom.txt", "1 | a red circle on a black background | one\n1 | a blue square on a white background | two\n",
          "utf-8-sig")
    story("four.txt", "1 | a red circle | caption | extra\n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    story("comments.txt", "# only comments\n\n# here\n")
    story("tiny_sec.txt", "1e-9 | a red circle on a black background\n1e-9 | a blue square\n")
    story("interp.txt", "1 | a red ${oc.env:HOME} circle on a black background\n1 | a blue square\n")
    story("crlf.txt", "1 | a red circle on a black background | one\r\n1 | a blue square | two\r\n")
    # a file where a folder is expected, for run dirs and plugin_dirs
    (d / "a_file").write_text("x")


# ----------------------------------------------------------------------------------------- checks
def literal_prompt(text: str) -> Callable[[Path, str], str | None]:
    def check(run: Path, out: str) -> str | None:
        man = run / "manifest.jsonl"
        if not man.is_file():
            return None  # refused: the error line is judged instead
        prompts = {json.loads(x).get("prompt") for x in man.read_text().splitlines() if x.strip()}
        prompts.discard(None)
        if prompts and text not in prompts:
            return f"silent: prompt became {sorted(prompts)[0]!r}"
        return None
    return check


def manifest_decodes(run: Path, out: str) -> str | None:
    """Every file a manifest line names exists and decodes; no PNG on disk outside the manifest."""
    from PIL import Image

    man = run / "manifest.jsonl"
    if not man.is_file():
        return None
    named = set()
    for line in man.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            return "loss: manifest line is not JSON"
        p = rec.get("path")
        if p:
            named.add(p)
            try:
                with Image.open(run / p) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001
                return f"loss: {p} does not decode ({type(e).__name__})"
    return None


def output_size(w: int, h: int) -> Callable[[Path, str], str | None]:
    def check(run: Path, out: str) -> str | None:
        from PIL import Image

        pngs = sorted((run / "images").glob("*.png")) if (run / "images").is_dir() else []
        if not pngs:
            return None
        with Image.open(pngs[0]) as im:
            if im.size != (w, h):
                return f"silent: output {im.size[0]}x{im.size[1]}, expected {w}x{h}"
        return None
    return check


def offline_run(run: Path, out: str) -> str | None:
    if not list(run.glob("wandb/offline-run-*")):
        return "silent: no offline W&B run"
    return None


# ----------------------------------------------------------------------------------------- cases
def cases() -> list[Case]:
    C = Case
    out: list[Case] = []
    add = out.append
    F = "{fx}"
    # ---- 6. types: a list where a number goes, a number where a list goes, a string where a number goes
    for key, val in [("steps", "[1,2]"), ("steps", "abc"), ("steps", "true"), ("steps", "null"),
                     ("batch_size", "[2]"), ("batch_size", "x"), ("batch_size", "1.5"), ("batch_size", "null"),
                     ("height", "abc"), ("height", "[32]"), ("width", "32.5"), ("width", "{a:1}"),
                     ("eta", "[0]"), ("eta", "abc"), ("eta", "null"), ("max_pixels", "[1]"), ("max_pixels", "1.5e6"),
                     ("seeds", "0"), ("seeds", "abc"), ("seeds", "[a]"), ("seeds", "[1.5]"), ("seeds", "{a:1}"),
                     ("seeds", "null"), ("prompts", "5"), ("prompts", "[1,2]"), ("prompts", "{a:b}"),
                     ("negative_prompt", "[a,b]"), ("negative_prompt", "5"), ("negative_prompt", "null"),
                     ("guidance_scales", "7.5"), ("guidance_scales", "[a]"), ("guidance_scales", "{a:1}"),
                     ("guidance_scales", "null"), ("device", "[cpu]"), ("device", "null"), ("dtype", "5"),
                     ("progress", "yes"), ("resume", "2"), ("overwrite", "[true]"), ("combine", "[zip]"),
                     ("name", "5"), ("name", "null"), ("plugin_dirs", "{a:1}"), ("model.seed", "abc"),
                     ("model.revision", "[main]"), ("model.height", "null"), ("scheduler.name", "[x]"),
                     ("guidance.params", "5")]:
        add(C(f"type:{key}={val}", "6", [f"{key}={val}"], [key]))
    add(C("type:guidance.cutoff.frac=[0.5]", "6", ["guidance=cutoff", "guidance.params.frac=[0.5]"], ["guidance.params.frac"]))
    add(C("type:recorders.x0.every=[1]", "6", ["recorders=[x0]", "recorders.x0.every=[1]"], ["recorders.x0.every"]))
    add(C("type:xyz.x=5", "6", ["experiment=xyz", "xyz.x=5"], ["xyz.x"]))
    add(C("type:two at once", "6", ["steps=[1]", "seeds=abc", "eta=x"], ["steps", "seeds", "eta"], lines=3))
    I2I = ["task=img2img", f"init_image={F}/good.png"]
    for key, val in [("strengths", "abc"), ("strengths", "{a:1}"), ("strengths", "[a]"), ("resize", "[crop]"),
                     ("max_size", "abc"), ("max_size", "[4]"), ("init_image", "5"), ("init_image", "{a:1}")]:
        add(C(f"type:img2img {key}={val}", "6", [*I2I, f"{key}={val}"], [key]))
    INP = ["task=inpaint", f"init_image={F}/good.png", "mask=[rect:0,0,16,16]"]
    for key, val in [("mask_blur", "abc"), ("mask_blur", "[4]"), ("paste_back", "maybe"), ("mask", "5"),
                     ("mask", "{a:1}"), ("mask", "[rect:1,2]"), ("mask", "[rect:a,b,c,d]"), ("mask", "[circle:nan,1,2]"),
                     ("mask", "[rect:0,0,1e400,5]"), ("mask_image", "[]")]:
        args = [a for a in INP if not a.startswith("mask=")] if key == "mask_image" else INP  # mask= would be used
        add(C(f"type:inpaint {key}={val}", "6", [*args, f"{key}={val}"], [key.split("_")[0] if key == "mask_image" else key]))
    WALK = ["task=walk", "prompts=[a red circle on a black background,a blue square]", "seeds=[0,1]", "segment_frames=2"]
    for key, val in [("frames", "abc"), ("frames", "[3]"), ("fps", "abc"), ("fps", "[12]"), ("loop", "2"),
                     ("gif", "yes"), ("pacing", "5"), ("audio_start", "abc"), ("audio_duration", "[1]"),
                     ("walker.text", "5"), ("walker.easing", "[linear]"), ("walker.easing", "bogus")]:
        add(C(f"type:walk {key}={val}", "6", [*WALK, f"{key}={val}"], [key]))
    for key, val in [("frames", "abc"), ("fps", "[8]")]:
        add(C(f"type:txt2video {key}={val}", "6", ["task=txt2video", f"{key}={val}"], [key]))

    # ---- 7. input files
    for name, key in [("trunc.png", "init_image"), ("trunc.jpg", "init_image"), ("empty.png", "init_image"),
                      ("text.png", "init_image"), ("bomb.png", "init_image"), ("bomb_warn.png", "init_image"),
                      ("huge_ok_header.png", "init_image"), ("mixed", "init_image"), ("txtdir", "init_image"),
                      ("emptydir", "init_image")]:
        add(C(f"file:img2img {name}", "7", ["task=img2img", f"init_image={F}/{name}", "height=32", "width=32"], [key]))
    add(C("file:img2img list with a bad item", "7", ["task=img2img", f"init_image=[{F}/good.png,{F}/trunc.jpg]"],
          ["init_image", "trunc.jpg"]))
    add(C("file:img2img bomb (inpaint)", "7", ["task=inpaint", f"init_image={F}/bomb.png", "mask=[rect:0,0,8,8]",
                                               "height=32", "width=32"], ["init_image"]))
    for name in ["mask_trunc.png", "mask_empty.png", "mask_text.png", "mask_bomb.png", "emptydir", "nope.png"]:
        add(C(f"file:inpaint mask_image={name}", "7", ["task=inpaint", f"init_image={F}/noise96.png",
                                                        f"mask_image={F}/{name}", "height=32", "width=32"], ["mask_image"]))
    add(C("file:inpaint EXIF source, mask in displayed pixels", "7",
          ["task=inpaint", f"init_image={F}/exif6.jpg", "mask=[rect:0,40,32,64]"], [], kind="ok",
          check=output_size(32, 64)))
    add(C("file:img2img EXIF source keeps displayed orientation", "7", ["task=img2img", f"init_image={F}/exif6.jpg"],
          [], kind="ok", check=output_size(32, 64)))
    add(C("file:inpaint EXIF source, mask outside displayed image", "7",
          ["task=inpaint", f"init_image={F}/exif6.jpg", "mask=[rect:40,0,64,32]"], ["mask"]))
    AUD = ["task=walk", "walker=audio", "prompts=[a red circle on a black background,a blue square]", "seeds=[0,1]",
           "walk_fps=4"]
    for name in ["text.wav", "noise.mp3", "silent0.wav", "blip.wav", "adir.wav"]:
        add(C(f"file:audio={name}", "7", [*AUD, f"audio={F}/{name}"], ["audio"]))
    add(C("file:audio_start past the end", "7", [*AUD, f"audio={F}/one_second.wav", "audio_start=5"], ["audio_start"]))
    add(C("file:audio_duration below one frame", "7", [*AUD, f"audio={F}/one_second.wav", "audio_duration=0.01"],
          ["audio_duration"]))
    add(C("file:audio_start=nan", "7", [*AUD, f"audio={F}/one_second.wav", "audio_start=nan"], ["audio_start"]))
    STORY = ["task=walk", "walker=story", "walk_fps=2"]
    for name, frag in [("latin1.txt", "line 2"), ("nan.txt", "line 1"), ("inf.txt", "line 2"), ("huge.txt", "story"),
                       ("many.txt", "story"), ("four.txt", "line 1"), ("binary.txt", "story"), ("comments.txt", "story"),
                       ("emptydir", "story"), ("tiny_sec.txt", "story")]:
        add(C(f"file:story={name}", "7", [*STORY, f"story={F}/{name}"], [frag]))
    add(C("file:story with a BOM runs", "7", [*STORY, f"story={F}/bom.txt"], [], kind="ok"))
    add(C("file:story with CRLF runs", "7", [*STORY, f"story={F}/crlf.txt"], [], kind="ok"))
    add(C("file:story ${...} stays literal", "9", [*STORY, f"story={F}/interp.txt"], [], kind="ok",
          check=lambda run, out: None if not (run / "manifest.jsonl").is_file() or "${oc.env:HOME}" in
          (run / "manifest.jsonl").read_text() else "silent: story prompt interpolated"))

    # ---- 8. output size limits apply to the real output size
    add(C("size:source 120px over max_pixels", "8", ["task=img2img", f"init_image={F}/src120.png", "max_pixels=5000"],
          ["max_pixels"]))
    add(C("size:source 4px below the model minimum", "8", ["task=img2img", f"init_image={F}/tiny4.png"], ["init_image"]))
    add(C("size:source 2x300 sliver", "8", ["task=img2img", f"init_image={F}/sliver.png"], ["init_image"]))
    add(C("size:inpaint source 120px over max_pixels", "8", ["task=inpaint", f"init_image={F}/src120.png",
                                                            "mask=[rect:0,0,60,60]", "max_pixels=5000"], ["max_pixels"]))
    add(C("size:width from source, height given small", "8", ["task=img2img", f"init_image={F}/src120.png",
                                                              "height=8"], ["height"]))
    add(C("size:walk frames over max_pixels", "8", [*WALK, "height=64", "width=64", "max_pixels=1000"], ["max_pixels"]))
    add(C("size:txt2video frames over max_pixels", "8", ["task=txt2video", "video_frames=16", "max_pixels=10000"],
          ["max_pixels"]))
    add(C("size:zoom walk over max_pixels", "8", ["experiment=zoom_walk", "height=64", "width=64", "max_pixels=2000"],
          ["max_pixels"]))

    # ---- 9. prompts are literal text
    for text in ["${oc.env:HOME}", "${steps}", "${nosuch}", "a ${oc.env:NOPE_NOT_SET} b", "${oc.decode:1}",
                 "cost $5 ${", "${name}/${steps}"]:
        add(C(f"literal:prompts={text}", "9", [f"prompts=['{text}']"], [], kind="ok", check=literal_prompt(text)))
    add(C("literal:negative_prompt=${name}", "9", ["negative_prompt='${name}'"], [], kind="ok",
          check=lambda run, out: None if not (run / "manifest.jsonl").is_file() or "${name}" in
          (run / ".hydra" / "config.yaml").read_text() else "silent: negative prompt interpolated"))

    # ---- 10. run dirs
    add(C("rundir:an existing file", "10", [f"hydra.run.dir={F}/a_file"], ["a_file"]))
    add(C("rundir:below a file", "10", [f"hydra.run.dir={F}/a_file/sub"], ["a_file"]))
    add(C("rundir:/proc (unwritable)", "10", ["hydra.run.dir=/proc/stablefused_run"], ["/proc/stablefused_run"]))
    add(C("rundir:empty value", "10", ["hydra.run.dir="], ["hydra.run.dir"]))
    add(C("rundir:empty quoted", "10", ["hydra.run.dir=''"], ["hydra.run.dir"]))
    add(C("rundir:name empty", "10", ["name=''"], ["name"]))
    add(C("rundir:read-only mount", "10", [f"hydra.run.dir={F}/../ro/run"], ["ro/run"],
          setup=lambda fx: _mount_ro(fx.parent / "ro"), teardown=lambda fx: _umount(fx.parent / "ro")))
    add(C("rundir:full disk", "10", [f"hydra.run.dir={F}/../full/run", "experiment=negative_guidance", "steps=2",
                                     "recorders=[]", "visualizers=[]"], ["full/run", "kept"],
          setup=lambda fx: _mount_full(fx.parent / "full"), teardown=lambda fx: _umount(fx.parent / "full"),
          check=manifest_decodes, timeout=90))
    add(C("rundir:sweep dir unwritable", "10", ["-m", "hydra.sweep.dir=/proc/stablefused_sweep", "seeds=0,1"],
          ["/proc/stablefused_sweep"]))

    # ---- 11. W&B settings
    W = ["logger=wandb"]
    for key, val, frag in [("logger.mode", "bogus", "logger.mode"), ("logger.mode", "5", "logger.mode"),
                           ("logger.tags", "abc", "logger.tags"), ("logger.tags", "5", "logger.tags"),
                           ("logger.tags", "[" + "x" * 80 + "]", "logger.tags"), ("logger.tags", "{a:1}", "logger.tags"),
                           ("logger.project", "''", "logger.project"), ("logger.project", "'a/b'", "logger.project"),
                           ("logger.project", "[a]", "logger.project"), ("logger.entity", "5", "logger.entity")]:
        add(C(f"wandb:{key}={val}", "11", [*W, f"{key}={val}"], [frag]))
    add(C("wandb:mode=online without credentials", "11", [*W, "logger.mode=online"], ["offline"], kind="warn",
          env={"WANDB_API_KEY": None, "WANDB_MODE": None}, check=offline_run))
    add(C("wandb:WANDB_MODE=online without credentials", "11", W, ["offline"], kind="warn",
          env={"WANDB_API_KEY": None, "WANDB_MODE": "online"}, check=offline_run))
    add(C("wandb:WANDB_MODE=bogus", "11", W, ["WANDB_MODE"], env={"WANDB_MODE": "bogus"}))

    # ---- 12. interrupts at any moment
    NG = ["experiment=negative_guidance", "steps=10", "recorders=[]", "visualizers=[]", "metrics=[]"]
    for t in (0.3, 0.8, 1.3, 2.0, 3.0, 4.5, 7.0):
        for sig in (signal.SIGINT, signal.SIGTERM):
            add(C(f"interrupt:{signal.Signals(sig).name} at {t}s", "12", NG, ["interrupted"], kind="interrupt",
                  signal_at=(t, sig), check=manifest_decodes, timeout=90))
    add(C("interrupt:SIGINT during sweep job", "12", ["-m", *NG, "seeds=[0],[1]"], ["interrupted"], kind="interrupt",
          signal_at=(4.0, signal.SIGINT), check=None, timeout=90))

    # ---- 13. a task's setting without its task
    for arg, task in [("strengths=[0.3]", "img2img"), (f"init_image={F}/good.png", "img2img"),
                      ("mask=[rect:0,0,8,8]", "inpaint"), ("mask_blur=2", "inpaint"), ("paste_back=false", "inpaint"),
                      ("resize=pad", "img2img"), ("max_size=2", "img2img"), ("loop=true", "walk"), ("gif=true", "walk"),
                      ("pacing=even", "walk"), ("audio_start=1", "walk"), (f"story={F}/bom.txt", "walk"),
                      ("walker=story", "walk"), ("walker.easing=linear", "walk"), ("walk_fps=5", "walk"),
                      ("segment_frames=3", "walk")]:
        add(C(f"task-key:{arg.split('=')[0]} without task", "13", [arg], [f"task={task}"]))
    add(C("task-key:frames under task=img2img", "13", [*I2I, "segment_frames=3"], ["task=walk"]))
    add(C("task-key:mask under task=img2img", "13", [*I2I, "mask=[rect:0,0,8,8]"], ["task=inpaint"]))
    add(C("task-key:strengths in a sweep", "13", ["-m", "strengths=[0.3],[0.6]"], ["task=img2img"]))

    # ---- 14. offline hub loads, with and without HF_HUB_OFFLINE
    for env in ({"HF_HUB_OFFLINE": None}, {"HF_HUB_OFFLINE": "1"}):
        tag = "no HF_HUB_OFFLINE" if env["HF_HUB_OFFLINE"] is None else "HF_HUB_OFFLINE=1"
        add(C(f"hub:model=sd15 ({tag})", "14", ["model=sd15"], ["model=sd15"], env=env, timeout=60))
        add(C(f"hub:model.hub_id=nobody/none ({tag})", "14", ["model=sd15", "model.hub_id=nobody/none"],
              ["nobody/none"], env=env, timeout=60))
        add(C(f"hub:metrics=[clip_score] ({tag})", "14", ["metrics=[clip_score]"], ["clip_score"], env=env, timeout=60))
        add(C(f"hub:sd15+clip+cuda together ({tag})", "14", ["model=sd15", "metrics=[clip_score]", "device=cuda"],
              ["model=sd15", "clip_score", "device=cuda"], lines=3, env=env, timeout=60))
    add(C("hub:model=sd_turbo (no HF_HUB_OFFLINE)", "14", ["model=sd_turbo"], ["model=sd_turbo"],
          env={"HF_HUB_OFFLINE": None}, timeout=60))
    add(C("hub:clip model_id typo (no HF_HUB_OFFLINE)", "14", ["metrics=[clip_score]",
                                                               "metrics.clip_score.model_id=openai/clip-vit-nope"],
          ["clip_score"], env={"HF_HUB_OFFLINE": None}, timeout=60))
    return out


def _mount_ro(d: Path) -> None:
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "bind,ro", str(d), str(d)], check=True)


def _mount_full(d: Path) -> None:
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(d)], check=True)


def _umount(d: Path) -> None:
    subprocess.run(["umount", str(d)], check=False)


# ----------------------------------------------------------------------------------------- classify
def problem_lines(out: str) -> list[str]:
    """What the user reads as the error: every line but INFO/WARNING log records and blanks."""
    keep = []
    for line in out.splitlines():
        s = line.strip()
        if not s or "][INFO]" in s or "][WARNING]" in s or "][HYDRA]" in s or s.startswith(("wandb:", "Warning:")) or "Warning: " in s:
            continue
        keep.append(s)
    return keep


def classify(case: Case, rc: int | None, out: str, run: Path) -> tuple[str, str]:
    if rc is None:
        return "hang", f"killed after {case.timeout:g}s"
    lines = problem_lines(out)
    first = lines[0][:160] if lines else ""
    if "Traceback (most recent call last)" in out or "Error executing job" in out or "HYDRA_FULL_ERROR" in out:
        import re

        errs = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Interrupted)\b", x)]
        what = errs[-1] if errs else next((x for x in lines if "HYDRA_FULL_ERROR" not in x), first)
        return "traceback", what[:160]
    if case.check is not None:
        try:
            bad = case.check(run, out)
        except Exception as e:  # noqa: BLE001
            bad = f"check failed: {type(e).__name__}: {e}"
        if bad:
            return ("loss" if bad.startswith("loss") else "silent"), bad
    if case.kind == "interrupt":
        if rc == 0:
            return "silent", "finished before the signal (timing)"
        if rc not in (130, 143):
            return "misleading", f"exit {rc}: {first}"
        hits = [x for x in lines if "interrupted" in x]
        return ("clear" if len(lines) == 1 and hits else "multi-line"), (hits or lines or [""])[0][:160]
    if case.kind == "ok":
        if rc == 0:
            return "clear", "ran as asked"
        return "misleading", f"refused: {first}"
    if case.kind == "warn":
        if rc != 0:
            return "misleading", f"exit {rc}: {first}"
        said = [x for x in out.splitlines() if all(f in x for f in case.expect)]
        return ("clear", said[0].strip()[:160]) if said else ("silent", "ran without saying so")
    if rc == 0:
        return "silent", "exit 0"
    if any("+" in x and ("use +" in x or "append" in x) for x in lines):
        return "misleading", first
    hits = [x for x in lines if x]
    named = all(any(f in x for x in hits) for f in case.expect)
    if not named:
        return "misleading", first
    if len(lines) > case.lines:
        return "multi-line", f"{len(lines)} lines: {first}"
    return "clear", first


def _default_signals() -> None:
    """The child starts with SIGINT/SIGTERM at their defaults, as in a terminal (a background job of a
    non-interactive shell, e.g. this script under nohup, would otherwise pass SIGINT on as ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def merge(base: Path, update: Path) -> str:
    """``base``'s table with the rows of ``update`` (same case ids) replacing its own; counts recomputed."""
    def rows(path: Path) -> dict[str, list[str]]:
        out = {}
        for line in path.read_text().splitlines():
            if line.startswith("| `"):
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                out[cells[0]] = cells
        return out

    table, new = rows(base), rows(update)
    table.update({k: v for k, v in new.items() if k in table})
    counts = collections.Counter(v[2] for v in table.values())
    by_point = collections.defaultdict(collections.Counter)
    for v in table.values():
        by_point[v[1]][v[2]] += 1
    lines = [f"{len(table)} bad inputs ({len(new)} rows from {update.name})\n",
             "| point | " + " | ".join(CLASSES) + " | total |", "|---" * (len(CLASSES) + 2) + "|"]
    for p in sorted(by_point, key=int):
        lines.append(f"| {p} | " + " | ".join(str(by_point[p][c]) for c in CLASSES) + f" | {sum(by_point[p].values())} |")
    lines.append("| **all** | " + " | ".join(f"**{counts[c]}**" for c in CLASSES) + f" | **{len(table)}** |")
    lines += ["", "| case | point | class | what the user saw | s |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(v) + " |" for v in table.values()]
    return "\n".join(lines)


def run_case(case: Case, fx: Path, work: Path, python: str) -> tuple[str, str, float]:
    run = work / "run"
    if run.exists():
        shutil.rmtree(run, ignore_errors=True)
    args = [a.replace("{fx}", str(fx)) for a in ((BASE if case.base else []) + case.args)]
    if "-m" in args:  # Hydra's flags go before the overrides
        args = ["-m"] + [a for a in args if a != "-m"]
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        args.append(f"hydra.run.dir={run}" if "-m" not in args else f"hydra.sweep.dir={run}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for k, v in case.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    if case.setup:
        case.setup(fx)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen([python, "-m", "stablefused", *args], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_default_signals)
        rc = None
        try:
            if case.signal_at:
                delay, sig = case.signal_at
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(sig)
            out, _ = proc.communicate(timeout=case.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        ran = run
        if "hydra.run.dir" in " ".join(args):
            ran = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")) or ".")
        cls, msg = classify(case, rc, out, ran if ran.is_absolute() else work / ran)
    finally:
        if case.teardown:
            case.teardown(fx)
    return cls, msg, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the cases whose id contains this (a|b: either)")
    ap.add_argument("--show", action="store_true", help="print each case's line as it runs")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--merge", nargs=2, metavar=("BASE", "UPDATE"),
                    help="print BASE's table with UPDATE's rows replacing the same cases (e.g. cases rerun)")
    a = ap.parse_args()
    if a.merge:
        text = merge(Path(a.merge[0]), Path(a.merge[1]))
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
        return
    todo = [c for c in cases() if any(part in c.id for part in a.only.split("|"))]
    if os.geteuid() != 0:
        todo = [c for c in todo if c.setup is None]
    tmp = Path(tempfile.mkdtemp(prefix="sf_bad_"))
    fx, work = tmp / "fx", tmp / "work"
    make_fixtures(fx)
    work.mkdir()
    rows = []
    t_all = time.perf_counter()
    for i, case in enumerate(todo):
        cls, msg, wall = run_case(case, fx, work, a.python)
        rows.append((case, cls, msg, wall))
        if a.show:
            print(f"[{i + 1}/{len(todo)}] {cls:<10} {wall:5.1f}s {case.id} :: {msg}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    counts = collections.Counter(c for _, c, _, _ in rows)
    by_point = collections.defaultdict(collections.Counter)
    for case, cls, _, _ in rows:
        by_point[case.point][cls] += 1
    lines = [f"{len(rows)} bad inputs, {time.perf_counter() - t_all:.0f} s\n",
             "| point | " + " | ".join(CLASSES) + " | total |", "|---" * (len(CLASSES) + 2) + "|"]
    for p in sorted(by_point, key=int):
        lines.append(f"| {p} | " + " | ".join(str(by_point[p][c]) for c in CLASSES) + f" | {sum(by_point[p].values())} |")
    lines.append("| **all** | " + " | ".join(f"**{counts[c]}**" for c in CLASSES) + f" | **{len(rows)}** |")
    lines += ["", "| case | point | class | what the user saw | s |", "|---|---|---|---|---|"]
    for case, cls, msg, wall in rows:
        lines.append(f"| `{case.id}` | {case.point} | {cls} | {msg.replace('|', '/')} | {wall:.1f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
