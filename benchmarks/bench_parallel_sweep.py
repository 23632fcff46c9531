"""Parallel sweep jobs on one machine (issue 19, point 18): the same N jobs run one after another, and at once
with the joblib launcher, with and without splitting the CPU threads between them.

    python benchmarks/bench_parallel_sweep.py                  # 4 jobs (seeds 0..3), bundled shapes model
    python benchmarks/bench_parallel_sweep.py --jobs 4 --steps 30 --launcher submitit_local

(a) sequential: ``-m`` with the basic launcher (one process, jobs one after another, torch's default threads);
(b) parallel, split: ``hydra/launcher=joblib`` with ``n_jobs=N``: StableFused gives each job
    ``cores // N`` threads (STABLEFUSED_THREADS / OMP_NUM_THREADS, set before the job processes start);
(c) parallel, not split (what happened before): the same, with ``STABLEFUSED_THREADS=0`` (no share set) and
    OMP_NUM_THREADS unset, so each job takes every core.

OMP_NUM_THREADS is removed from the environment of all three (a job must find its own thread count). Wall time
and CPU time (user+sys of the whole process tree) per way, and the ratios to (a). logger=none.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(tmp: Path, name: str, jobs: int, steps: int, launcher: list[str], env_extra: dict) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "STABLEFUSED_THREADS")}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env_extra})
    seeds = ",".join(f"[{i}]" for i in range(jobs))
    args = [sys.executable, "-m", "stablefused", "-m", "model=shapes", f"seeds={seeds}", f"steps={steps}",
            "guidance_scales=[3,7.5]", "logger=none", "progress=false", *launcher,
            f"hydra.sweep.dir={tmp / name}"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        sys.exit(f"{name} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--launcher", default="joblib", choices=["joblib", "submitit_local"])
    a = ap.parse_args()
    par = [f"hydra/launcher={a.launcher}"] + ([f"hydra.launcher.n_jobs={a.jobs}"] if a.launcher == "joblib" else [])
    ways = [("sequential (basic launcher)", [], {}),
            (f"parallel, {a.launcher}, threads split", par, {}),
            (f"parallel, {a.launcher}, not split (each job takes every core)", par, {"STABLEFUSED_THREADS": "0"})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, launcher, extra) in enumerate(ways):
            rows.append((name, *sweep(Path(tmp), f"s{i}", a.jobs, a.steps, launcher, extra)))
    cores = len(os.sched_getaffinity(0))
    print(f"## {a.jobs} sweep jobs (shapes model, 4 prompts x 2 scales x {a.steps} steps each) on {cores} cores\n")
    print("| way | wall (s) | CPU (s) | wall / sequential | CPU / sequential |\n|---|---|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / rows[0][1]:.2f} | {cpu / rows[0][2]:.2f} |")
    print(f"\nload average when done: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
