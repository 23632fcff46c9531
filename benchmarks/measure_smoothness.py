"""How smoothly a walk's video moves: the RMS change between consecutive frames of run dirs' frames/*.png
(and the frame count of their walk.mp4).

    python -m stablefused experiment=zoom_walk hydra.run.dir=runs/zoom
    python -m stablefused experiment=zoom_walk segment_frames=1 hydra.run.dir=runs/zoom_keyframes   # no crops between
    python benchmarks/measure_smoothness.py runs/zoom runs/zoom_keyframes

max/median near 1 and a low CV (std/mean) = an even motion without jumps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(dirs: list[str]) -> None:
    import imageio.v2 as iio

    print("| run | frames | MP4 frames | RMS change per frame: mean | median | max | max/median | CV |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dirs:
        files = sorted(Path(d, "frames").glob("*.png"))
        a = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64) / 255 for f in files])
        r = np.sqrt(((a[1:] - a[:-1]) ** 2).reshape(len(a) - 1, -1).mean(1))
        with iio.get_reader(str(Path(d, "walk.mp4")), format="FFMPEG") as reader:
            n = sum(1 for _ in reader)
        print(f"| {d} | {len(files)} | {n} | {r.mean():.3f} | {np.median(r):.3f} | {r.max():.3f} | "
              f"{r.max() / np.median(r):.2f} | {r.std() / r.mean():.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
