"""Start-up cost of ``python -m stablefused``: what importing the app costs, and the wall time of a minimal run.

    python benchmarks/bench_startup.py                  # default command, median of 3
    python benchmarks/bench_startup.py --repeats 5 --top 25
    python benchmarks/bench_startup.py --cmd "seeds=[0] steps=1 logger=wandb"

(a) ``python -X importtime -c "import stablefused.app"``: the modules with the largest cumulative import time
    (top level of each import chain only, so nested modules are not counted twice), plus which heavy
    libraries (wandb, matplotlib, the shapes training code, top-level ``diffusers``) the import pulled in.
(b) wall and CPU time of ``python -m stablefused <cmd>`` (default ``seeds=[0] steps=1 logger=none``, into a
    temporary run dir), median of ``--repeats`` runs, and the heavy modules that command imported at all.

(c) with ``--floor``: the same command against the bare library floor, a Python process that imports
    diffusers, loads the same components (the bundled shapes model's folder, ``StableDiffusionPipeline``),
    runs the same images (the model's 4 example prompts, seed 0, guidance 7.5, 32x32) for one step and saves
    the PNGs. Runs alternate (CLI, floor, CLI, floor, ...) so that a busy machine slows both alike; the table
    gives medians and the ratio CLI / floor (issue 19's goal: <= 1.2).

    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py --floor --repeats 5

Each measurement is a fresh subprocess with the current environment (``OMP_NUM_THREADS``, ``HF_HUB_OFFLINE``...).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ["wandb", "matplotlib", "stablefused.shapes.train", "diffusers.pipelines", "transformers.models.clip",
         "torch._dynamo", "sympy"]
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def importtime(code: str) -> list[tuple[int, int, str]]:
    """(cumulative µs, depth, module) for every import ``code`` makes."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True)
    rows = []
    for line in res.stderr.splitlines():
        m = LINE.match(line)
        if m:
            rows.append((int(m[2]), len(m[3]) // 2, m[4]))
    return rows


def first_party(name: str) -> bool:
    return name.startswith(("stablefused", "plugins", "_stablefused"))


def top_imports(rows: list[tuple[int, int, str]], top: int) -> list[tuple[int, str, str]]:
    """The costliest third-party imports made directly by a first-party module: (µs, module, importer).
    ``-X importtime`` lists a module's imports before the module itself, one level deeper."""
    out = []
    for i, (cum, depth, name) in enumerate(rows):
        if first_party(name):
            continue
        parent = next((n for _, d, n in rows[i + 1:] if d == depth - 1), None) if depth else "(top level)"
        if parent and (first_party(parent) or parent == "(top level)"):
            out.append((cum, name, parent))
    return sorted(out, reverse=True)[:top]


def heavy_present(modules: set[str]) -> list[str]:
    return [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)]


FLOOR = """
import sys, torch
from diffusers import StableDiffusionPipeline
torch.set_grad_enabled(False)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
prompts = sys.argv[3].split("|")
g = [torch.Generator().manual_seed(0) for _ in prompts]
images = pipe(prompts, num_inference_steps=1, guidance_scale=7.5, height=32, width=32, generator=g).images
for i, im in enumerate(images):
    im.save(f"{sys.argv[2]}/{i}.png")
"""


def floor_vs_cli(cmd: str, repeats: int) -> None:
    """(c): alternate the CLI command and the bare-diffusers floor; medians and their ratio."""
    from omegaconf import OmegaConf

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = OmegaConf.load(os.path.join(root, "conf", "model", "shapes.yaml"))
    folder = os.path.join(root, "stablefused", "models", "shapes")
    prompts = "|".join(model.example_prompts)
    argv = [sys.executable, "-m", "stablefused", *shlex.split(cmd)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows: dict[str, list[tuple[float, float]]] = {"cli": [], "floor": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for kind in ("cli", "floor"):
                out = os.path.join(tmp, f"{kind}{i}")
                os.makedirs(out)
                run = argv + [f"hydra.run.dir={out}"] if kind == "cli" else \
                    [sys.executable, "-c", FLOOR, folder, out, prompts]
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                res = subprocess.run(run, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if res.returncode:
                    sys.exit(f"{kind} failed ({res.returncode}):\n{res.stderr[-2000:]}")
                rows[kind].append((wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    print(f"## (c) `python -m stablefused {cmd}` vs the bare library floor ({repeats} alternating runs each)\n")
    print("| | wall median (s) | CPU median (s, user+sys) |\n|---|---|---|")
    print(f"| CLI | {med['cli'][0]:.2f} | {med['cli'][1]:.2f} |")
    print(f"| floor (import diffusers, load the shapes pipeline, 4 images x 1 step, save) | {med['floor'][0]:.2f} | "
          f"{med['floor'][1]:.2f} |")
    print(f"| **ratio CLI / floor** | **{med['cli'][0] / med['floor'][0]:.2f}** | "
          f"**{med['cli'][1] / med['floor'][1]:.2f}** |")
    print(f"\nload average when done: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cmd", default="seeds=[0] steps=1 logger=none")
    ap.add_argument("--floor", action="store_true", help="only (c): the command vs the bare library floor")
    args = ap.parse_args()
    if args.floor:
        floor_vs_cli(args.cmd, args.repeats)
        return

    rows = importtime("import stablefused.app")
    total = next(c for c, _, n in rows if n == "stablefused.app")
    print(f"## (a) `python -X importtime -c \"import stablefused.app\"`: {total / 1e6:.2f} s\n")
    print("| module | imported by | cumulative (s) |\n|---|---|---|")
    for cum, name, parent in top_imports(rows, args.top):
        print(f"| {name} | {parent} | {cum / 1e6:.3f} |")
    print(f"\nheavy libraries imported by `import stablefused.app`: "
          f"{', '.join(heavy_present({n for _, _, n in rows})) or 'none'}\n")

    argv = [sys.executable, "-m", "stablefused", *shlex.split(args.cmd)]
    times, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            res = subprocess.run(argv + [f"hydra.run.dir={tmp}/{i}"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            times.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            if res.returncode:
                sys.exit(f"command failed ({res.returncode}):\n{res.stderr[-2000:]}")
        # which modules the whole command imported (one extra run under -X importtime)
        res = subprocess.run([sys.executable, "-X", "importtime", *argv[1:], f"hydra.run.dir={tmp}/imports"],
                             capture_output=True, text=True)
        run_modules = {m[4] for m in map(LINE.match, res.stderr.splitlines()) if m}
    print(f"## (b) `python -m stablefused {args.cmd}`\n")
    print("| runs | wall median (s) | wall min (s) | wall max (s) | CPU median (s, user+sys) |\n|---|---|---|---|---|")
    print(f"| {args.repeats} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | "
          f"{statistics.median(cpu):.2f} |")
    print("\n(CPU time is the steadier number on a shared machine: wall time includes waiting for a core.)")
    print(f"\nheavy libraries imported by the command: {', '.join(heavy_present(run_modules)) or 'none'}")


if __name__ == "__main__":
    main()
