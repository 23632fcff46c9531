"""A guidance x seed sweep three ways, through the CLI, wall time end to end.

    OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py                      # bundled shapes model, 4 x 3 cells
    python benchmarks/bench_sweep.py --model tiny_random --steps 4
    python benchmarks/bench_sweep.py --scales 0 3 7.5 12 --seeds 0 1 2 --keep /tmp/bench_sweep

(a) one ``python -m stablefused`` per cell (12 processes, 12 model loads);
(b) one ``-m`` sweep with the basic launcher (1 process, 1 model load, 12 jobs, 12 fresh schedulers and
    plugins, the sweep report at the end);
(c) one run with every cell batched (``guidance_scales=[...] seeds=[...]``: cells share UNet batches).

Prints a Markdown table with wall times and the ratios to (a), and how many of (b)'s and (c)'s images are
byte-identical to (a)'s (matched on prompt, seed and guidance scale from the manifests). logger=none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "stablefused", *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(args)}\n{res.stderr[-3000:]}")
    return dt


def images(run_dirs: list[Path]) -> dict[tuple, bytes]:
    out = {}
    for d in run_dirs:
        for line in (d / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["type"] == "image":
                out[(r["prompt"], r["seed"], float(r["guidance_scale"]))] = (d / r["path"]).read_bytes()
    return out


def fmt(xs: list[float]) -> str:
    return "[" + ",".join(f"{x:g}" for x in xs) + "]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's (20)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 3, 7.5, 12])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", type=Path, default=None, help="write the runs here (default: a temp dir)")
    args = ap.parse_args()

    base = [f"model={args.model}", "logger=none", "progress=false"]
    if args.steps is not None:
        base.append(f"steps={args.steps}")
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    out = Path(tmp.name) if tmp else args.keep
    cells = [(g, s) for g in args.scales for s in args.seeds]

    t_a, dirs_a = 0.0, []
    for i, (g, s) in enumerate(cells):
        d = out / "a" / str(i)
        t_a += cli(*base, f"guidance_scales=[{g:g}]", f"seeds=[{s}]", f"hydra.run.dir={d}")
        dirs_a.append(d)
    sweep = ",".join(f"[{g:g}]" for g in args.scales), ",".join(f"[{s}]" for s in args.seeds)
    t_b = cli("-m", *base, f"guidance_scales={sweep[0]}", f"seeds={sweep[1]}", f"hydra.sweep.dir={out / 'b'}")
    dirs_b = sorted((p for p in (out / "b").iterdir() if (p / "manifest.jsonl").is_file()), key=lambda p: p.name)
    t_c = cli(*base, f"guidance_scales={fmt(args.scales)}", f"seeds={fmt(args.seeds)}", f"hydra.run.dir={out / 'c'}")

    ref = images(dirs_a)
    same = lambda got: sum(got.get(k) == v for k, v in ref.items())
    n_b, n_c = same(images(dirs_b)), same(images([out / "c"]))
    print(f"model {args.model}, {len(args.scales)} guidance scales {fmt(args.scales)} x {len(args.seeds)} seeds "
          f"{fmt(args.seeds)} = {len(cells)} cells, {len(ref)} images, steps {args.steps or 'default (20)'}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, CPU\n")
    print("| way | processes | wall (s) | ratio to (a) | images byte-identical to (a) |")
    print("|---|---|---|---|---|")
    print(f"| (a) {len(cells)} separate runs | {len(cells)} | {t_a:.1f} | 1.00 | – |")
    print(f"| (b) one -m sweep, basic launcher | 1 | {t_b:.1f} | {t_b / t_a:.2f} | {n_b}/{len(ref)} |")
    print(f"| (c) one run, cells batched | 1 | {t_c:.1f} | {t_c / t_a:.2f} (goal <= 0.25) | {n_c}/{len(ref)} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
