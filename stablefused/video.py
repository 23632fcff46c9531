"""Video files: frames streamed into an H.264 MP4 (yuv420p), captions burned in, a soundtrack muxed in with
ffmpeg, SubRip subtitles."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from stablefused.outputs import font

VIDEO_MIN_SIDE = 256  # small models' frames are upscaled (nearest) to at least this in the video


# --------------------------------------------------------------------------------------------- video
def video_size(h: int, w: int) -> tuple[int, int, int]:
    scale = max(1, math.ceil(VIDEO_MIN_SIDE / min(h, w)))
    return scale, -(-h * scale // 16) * 16, -(-w * scale // 16) * 16


def video_frame(png: Path, scale: int, height: int, width: int, caption: str | None, caption_size: float) -> np.ndarray:
    img = Image.open(png).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
    out = Image.new("RGB", (width, height), "black")
    out.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    if caption:
        from stablefused.runs import wrap

        size = max(10, int(caption_size * height))
        text = wrap(caption, max(8, int(width / (0.55 * size))))
        d = ImageDraw.Draw(out)
        d.multiline_text((width // 2, height - size // 2), text, font=font(size), fill="white", anchor="md",
                         align="center", stroke_width=max(1, size // 10), stroke_fill="black")
    return np.asarray(out)


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"ffmpeg failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")


def write_mp4(path: Path, frames: Iterable[np.ndarray], fps: float, macro_block_size: int = 16) -> Path:
    """The one MP4 writer: H.264 via imageio-ffmpeg (libx264, yuv420p), ``frames`` (uint8 (H, W, 3)) streamed
    one at a time. Frame sides must be multiples of ``macro_block_size`` (imageio resizes others): 16 for
    composed frames, 2 (even) to keep frames exact."""
    import imageio.v2 as iio2

    with iio2.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                         pixelformat="yuv420p", macro_block_size=macro_block_size,
                         ffmpeg_log_level="error") as writer:
        for f in frames:
            writer.append_data(f)
    return path


def mux_audio(video: Path, audio: str, start: float, duration: float | None, out: Path) -> Path:
    """``video`` with ``audio`` from ``start`` s (for ``duration`` s) as its soundtrack, written to ``out``."""
    ffmpeg("-i", str(video), "-ss", f"{start:.6f}", "-t", f"{duration:.6f}", "-i", audio, "-map", "0:v:0",
           "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-shortest", str(out))
    return out


def write_gif(video: Path, gif: Path) -> Path:
    """A GIF of ``video`` (palette made from the video by ffmpeg), looping."""
    ffmpeg("-i", str(video), "-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", "0", str(gif))
    return gif


def write_srt(path: Path, records: list[dict], fps: float) -> Path | None:
    """Subtitles: one cue per run of frames with the same caption."""
    cues, start = [], 0
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].get("caption") != records[start].get("caption"):
            if records[start].get("caption"):
                cues.append((records[start]["frame"] / fps, (records[i - 1]["frame"] + 1) / fps,
                             records[start]["caption"]))
            start = i
    if not cues:
        return None

    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    path.write_text("".join(f"{n}\n{ts(a)} --> {ts(b)}\n{text}\n\n" for n, (a, b, text) in enumerate(cues, 1)))
    return path
