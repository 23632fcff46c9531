import math

import numpy as np

from stablefused.registry import PluginError, register
from stablefused.walkers import Frame, Walker

MISSING = "walker=audio needs librosa and soundfile: pip install 'stablefused[audio]'"


def load_librosa():
    try:
        import librosa
        import soundfile  # noqa: F401
    except ImportError:
        raise PluginError(MISSING) from None
    return librosa


def percussive_envelope(path, start=0.0, duration=None, margin=1.0):
    """(envelope in [0, 1] per spectrogram frame, its frame times in s, the slice's duration in s): the
    loudest mel band of the percussive part, as stable-diffusion-videos' get_timesteps_arr."""
    librosa = load_librosa()
    y, sr = librosa.load(path, sr=None, offset=float(start), duration=duration)  # native rate: no resampling
    if len(y) == 0:
        raise ValueError(f"audio={path}: no samples between audio_start={start} and its end")
    hop = 2 ** round(math.log2(sr / 43.0))  # ~23 ms, as 512 samples at 22.05 kHz
    stft = librosa.stft(y, n_fft=4 * hop, hop_length=hop, win_length=4 * hop)
    _, percussive = librosa.decompose.hpss(stft, margin=margin)
    y_perc = librosa.istft(percussive, length=len(y), hop_length=hop)
    spec = librosa.feature.melspectrogram(y=y_perc, sr=sr, n_fft=4 * hop, hop_length=hop).max(axis=0)
    env = (spec - spec.min()) / max(float(np.ptp(spec)), 1e-12)
    times = librosa.frames_to_time(np.arange(len(env)), sr=sr, hop_length=hop)
    return env, times, len(y) / sr


SOUNDFILE_FORMATS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64")


def _duration(librosa, path) -> float:
    """Seconds of audio in ``path``, from its header (soundfile; libsndfile's C decoders print their notes on
    the process's stderr, silenced here). Only formats libsndfile cannot read go to librosa's audioread
    fallback, which may take many seconds to give up on a broken file."""
    import os
    import warnings

    import soundfile

    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            info = soundfile.info(str(path))
            return float(info.frames) / float(info.samplerate or 1)
        except Exception:
            if path.suffix.lower() in SOUNDFILE_FORMATS:
                raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa's audioread fallback warns before it fails
        return float(librosa.get_duration(path=str(path)))


def audio_problems(librosa, walk) -> list[str]:
    """The audio file decodes (its header, cheaply) and the slice the walk uses lasts at least one frame."""
    from pathlib import Path

    path = Path(walk.audio)
    if path.is_dir():
        return [f"audio={walk.audio}: is a folder; give an audio file (wav, flac, ogg, mp3)"]
    try:
        total = _duration(librosa, path)
    except Exception as e:  # soundfile / audioread: not audio, or a format neither can read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        first = first.replace(f"Error opening {str(path)!r}: ", "")
        return [f"audio={walk.audio}: cannot decode it as audio ({first or type(e).__name__}); give a wav, flac, "
                "ogg or mp3 file"]
    start = float(walk.audio_start)
    if total <= 0:
        return [f"audio={walk.audio}: holds no samples (0 s); give a file with sound"]
    if start >= total:
        return [f"audio_start={start:g}: past the end of audio={walk.audio} ({total:.3g} s); use audio_start < {total:.3g}"]
    length = total - start if walk.audio_duration is None else min(float(walk.audio_duration), total - start)
    if length * walk.fps < 2:
        key = "audio_duration" if walk.audio_duration is not None and walk.audio_duration < total - start else "audio"
        value = walk.audio_duration if key == "audio_duration" else walk.audio
        return [f"{key}={value}: {length:.3g} s of audio is less than two frames at fps={walk.fps:g} "
                f"({2 / walk.fps:.3g} s; a walk needs a first and a last frame); use a longer slice or a higher fps"]
    return []


@register("walkers", "audio")
class Audio(Walker):
    """Paced by an audio file's beats (percussive envelope, librosa); the MP4 lasts as long as the audio and carries it.

    Task keys audio=, audio_start=, audio_duration=, fps=. ``floor``: the speed between beats (fraction of
    the loudest beat's); ``smooth``: smooth the envelope; ``margin``: librosa.decompose.hpss margin."""

    paces_itself = True

    def __init__(self, text: str = "slerp", margin: float = 1.0, smooth: float = 0.0, floor: float = 0.1):
        super().__init__(text=text, easing="linear")
        if not 0 <= float(smooth) < 1:
            raise PluginError(f"walker.smooth={smooth!r}: must be in [0, 1)")
        if not 0 <= float(floor) < 1:
            raise PluginError(f"walker.floor={floor!r}: must be in [0, 1)")
        self.margin, self.smooth, self.floor = float(margin), float(smooth), float(floor)

    def check_walk(self, walk, keyframes, problems):
        super().check_walk(walk, keyframes, problems)
        if not walk.audio:
            problems.append("audio: not set; walker=audio needs audio=path/to/song.wav")
        try:
            librosa = load_librosa()
        except PluginError as e:
            problems.append(str(e))
            return
        if walk.audio:
            problems += audio_problems(librosa, walk)


    def speeds(self, env: np.ndarray, times: np.ndarray, fps: float, steps: int) -> np.ndarray:
        """The walk's speed from frame n to n + 1: the envelope's peak within that step (a click never falls
        between samples), optionally smoothed."""
        edges = np.arange(steps + 1) / fps
        out = np.empty(steps)
        for n in range(steps):
            inside = (times >= edges[n]) & (times < edges[n + 1])
            out[n] = env[inside].max() if inside.any() else np.interp((edges[n] + edges[n + 1]) / 2, times, env)
        for n in range(1, steps if self.smooth else 0):
            out[n] = self.smooth * out[n - 1] + (1 - self.smooth) * out[n]
        return out  # in [0, 1]

    def plan(self, walk, keyframes):
        env, times, duration = percussive_envelope(walk.audio, walk.audio_start, walk.audio_duration, self.margin)
        total = max(2, int(round(duration * walk.fps)))  # the video lasts as long as the audio
        loop = walk.loop or self.closed
        segs = self.segments(walk, keyframes)
        steps = total if loop else total - 1
        speed = self.floor + (1 - self.floor) * self.speeds(env, times, walk.fps, steps) + 1e-6
        cum = np.concatenate([[0.0], np.cumsum(speed)])  # cum[n]: path travelled by frame n
        bounds = [round(s * steps / segs) for s in range(segs + 1)]
        frames = []
        for s in range(segs):
            lo, hi = bounds[s], bounds[s + 1]
            for n in range(lo, hi):
                pos = 0.0 if n == lo else float((cum[n] - cum[lo]) / (cum[hi] - cum[lo]))
                frames.append(Frame(n, s, pos, n / walk.fps, {"speed": round(float(speed[n]), 6)}))
        if not loop:
            frames.append(Frame(total - 1, segs - 1, 1.0, (total - 1) / walk.fps, {"speed": 0.0}))
        self.duration = total / walk.fps
        return frames

    def soundtrack(self, walk):
        return str(walk.audio), float(walk.audio_start), self.duration
