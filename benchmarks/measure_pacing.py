"""pacing=uniform vs pacing=even on the bundled model: the coefficient of variation (std / mean) of the RMS
pixel change between consecutive frames of a walk (lower = more evenly paced; goal for even: <= 0.3).

    OMP_NUM_THREADS=1 python benchmarks/measure_pacing.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from stablefused.app import run
from stablefused.paths import config_dir
from stablefused.pacing import frame_distances

WALKS = {
    "red circle → blue triangle (2 keyframes)": [
        'prompts=["a red circle on a black background","a small blue triangle on a white background"]',
        "seeds=[0,1]"],
    "experiment=latent_walk (4-keyframe loop)": ["experiment=latent_walk"],
}


def cv(run_dir: Path) -> tuple[float, float, int]:
    recs = [json.loads(x) for x in (run_dir / "manifest.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "frame"]
    imgs = np.stack([np.asarray(Image.open(run_dir / r["path"]).convert("RGB")) / 255.0 for r in recs])
    d = frame_distances(imgs)
    # per segment: consecutive frames within one segment (the pair that starts at each frame)
    seg = np.array([r["keyframe"] for r in recs[:-1]])
    within = [d[seg == s].std() / d[seg == s].mean() for s in np.unique(seg) if (seg == s).sum() > 1]
    return float(d.std() / d.mean()), float(np.mean(within)), len(recs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"| walk (bundled model, {args.steps} DDIM steps, {args.frames} frames per segment) | pacing | frames | "
          "CV whole walk | CV within segments (mean) | time (s) |")
    print("|---|---|---|---|---|---|")
    for label, overrides in WALKS.items():
        for pacing in ("uniform", "even"):
            with tempfile.TemporaryDirectory() as tmp:
                with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                    cfg = compose("config", overrides=["task=walk", *overrides, f"segment_frames={args.frames}",
                                                       f"steps={args.steps}", f"pacing={pacing}", "logger=none",
                                                       "progress=false"])
                t = time.perf_counter()
                run(cfg, Path(tmp))
                secs = time.perf_counter() - t
                whole, within, n = cv(Path(tmp))
            print(f"| {label} | {pacing} | {n} | {whole:.3f} | {within:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
