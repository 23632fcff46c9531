"""The Python API's model cache: what a second ``sf.run`` on the same model costs, against the first call's
model load, and ``import stablefused``.

    OMP_NUM_THREADS=1 python benchmarks/bench_api.py                  # bundled shapes model, median of 3
    OMP_NUM_THREADS=1 python benchmarks/bench_api.py --repeats 5 --model tiny_random

Each repeat is a fresh Python process (a cold model cache) that calls ``sf.run`` twice with the same minimal
run (one image, one step, no logger, no plugins) into two run dirs, and times inside each call:

* ``model``: getting the components (``load_components`` as ``app.run`` calls it): a load from disk on the
  first call (measured twice: as a user meets it, importing diffusers/transformers on the way, and with those
  libraries imported beforehand, the weights alone), the process cache on the second;
* ``task``: the task itself (sampling, decoding, writing the PNG and the grid);
* ``overhead``: the rest of the call (compose, validation, run dir, status.json, logger, Result).

Goals (issue 18): the second call's model time, and its whole overhead (everything but the task), are each at
most 10 % of the first call's model load. Also printed: ``import stablefused`` (the API loads lazily) and a CLI
call of the same run for comparison (a new process loads the model every time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import stablefused as sf
t_import = time.perf_counter() - t0
import stablefused.app as app

timers = {}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - t
    return wrapper

app.load_components = timed("model", app.load_components)   # the name app.run calls
app._run_task = timed("task", app._run_task)

out, model, preimport = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if preimport:  # the model classes' libraries imported before the clock starts: the load is the weights only
    import diffusers, transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
calls = []
for i in range(2):
    timers.clear()
    t = time.perf_counter()
    sf.run(task="txt2img", model=model, prompts=None, seeds=[0], guidance_scales=[7.5], steps=1, logger="none",
           recorders=[], metrics=[], visualizers=[], progress=False, run_dir=f"{out}/call{i}")
    wall = time.perf_counter() - t
    calls.append({"wall": wall, "model": timers["model"], "task": timers["task"],
                  "overhead": wall - timers["model"] - timers["task"]})
print(json.dumps({"import": t_import, "calls": calls}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="shapes")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    runs, weights_only, cli = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for pre, into in (("0", runs), ("1", weights_only)):
                res = subprocess.run([sys.executable, "-c", CHILD, f"{tmp}/{pre}", args.model, pre],
                                     capture_output=True, text=True, env=env, cwd=tmp)
                if res.returncode:
                    sys.exit(res.stderr[-3000:])
                into.append(json.loads(res.stdout.strip().splitlines()[-1]))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "stablefused", "task=txt2img", f"model={args.model}", "seeds=[0]",
                            "guidance_scales=[7.5]", "steps=1", "logger=none", "recorders=[]", "metrics=[]",
                            "visualizers=[]", "progress=false", f"hydra.run.dir={tmp}/cli"], capture_output=True,
                           env=env, cwd=tmp, check=True)
            cli.append(time.perf_counter() - t)

    def med(call: int, key: str, rows: list = runs) -> float:
        return statistics.median(r["calls"][call][key] for r in rows)

    load, weights = med(0, "model"), med(0, "model", weights_only)
    print(f"model={args.model}, median of {args.repeats} fresh processes, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}\n")
    print("| sf.run call | wall (s) | model (s) | task (s) | overhead (s) |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(("first (cold cache)", "second (same model)")):
        print(f"| {name} | {med(i, 'wall'):.3f} | {med(i, 'model'):.4f} | {med(i, 'task'):.3f} | "
              f"{med(i, 'overhead'):.3f} |")
    print(f"| first, libraries imported beforehand | {med(0, 'wall', weights_only):.3f} | {weights:.4f} | "
          f"{med(0, 'task', weights_only):.3f} | {med(0, 'overhead', weights_only):.3f} |")
    print()
    second = med(1, "model")
    rest = second + med(1, "overhead")
    print("| second call, against the first call's model load | load with imports | load of the weights only | goal |")
    print("|---|---|---|---|")
    print(f"| model time (cache) | {second / load:.4f} | {second / weights:.4f} | <= 0.10 |")
    print(f"| model time + all other overhead (no task) | {rest / load:.3f} | {rest / weights:.3f} | <= 0.10 |")
    print()
    print(f"import stablefused: {1000 * statistics.median(r['import'] for r in runs):.1f} ms; "
          f"the same run with the CLI (a new process): {statistics.median(cli):.2f} s wall")


if __name__ == "__main__":
    main()
