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
            load_librosa()
        except PluginError as e:
            problems.append(str(e))

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
