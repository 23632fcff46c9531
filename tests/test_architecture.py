"""Facts a reviewer can check about the code's shape (issue 15): each one fails when the shape regresses."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stablefused import registry

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_GROUPS = {"recorders": "recorders", "visualizers": "visualizers", "metrics": "metrics", "walker": "walkers"}


def test_no_yaml_plugin_param_restates_a_constructor_default():
    """conf/<group>/<name>.yaml selects a plugin and may override; the defaults are the constructor's only."""
    registry.discover()
    restated = []
    for group, kind in PLUGIN_GROUPS.items():
        for f in sorted((ROOT / "conf" / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(f))
            node.pop("defaults", None)
            params = dict(node) if group == "walker" else dict(node.get(f.stem) or {})
            params.pop("name" if group == "walker" else registry.SELECTED, None)
            accepted = registry._parameters(registry.get(kind, f.stem))
            for key, value in params.items():
                p = accepted.get(key)
                default = None if p is None or p.default is inspect.Parameter.empty else p.default
                if p is not None and (value == default or (isinstance(default, tuple) and value == list(default))):
                    restated.append(f"{f.relative_to(ROOT)}: {key}={value!r}")
    assert not restated, restated


def test_plugin_yaml_takes_the_constructor_defaults_and_plain_overrides():
    """The composed config holds every constructor default (so ``visualizers.denoise_video.fps=4`` needs no
    ``+``), and an override replaces just its key."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg("task=walk", "visualizers=[denoise_video,step_strip]", "visualizers.denoise_video.fps=4",
                      "walker=zoom", "walker.direction=in")
    registry.discover()
    for name in ("denoise_video", "step_strip"):
        expected = {**registry.param_defaults(registry.get("visualizers", name)), registry.SELECTED: True}
        if name == "denoise_video":
            expected["fps"] = 4
        assert OmegaConf.to_container(cfg.visualizers[name]) == expected
    assert OmegaConf.to_container(cfg.walker) == {**registry.param_defaults(registry.get("walkers", "zoom")),
                                                  "direction": "in", "name": "zoom"}


# ------------------------------------------------------------------------------------------ imports
def modules(package: str = "stablefused") -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported(file: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``file`` (module ``name``) imports anywhere: at the top, inside a
    function, or under ``if TYPE_CHECKING:`` (a dependency all the same: runs.py <-> tasks/__init__.py was a
    circle through a lazy import one way and a TYPE_CHECKING import the other)."""
    tree = ast.parse(file.read_text())
    is_pkg = file.name == "__init__.py"

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else resolve(base))
    return {m for m in out if m and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_among_stablefused_modules():
    known = modules()
    graph = {name: imported(f, name, known) for name, f in known.items()}
    assert graph["stablefused.app"] and "stablefused.runs" in graph["stablefused.tasks.txt2img"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in modules() if n != "stablefused.__main__"]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok', len(sys.argv) - 1)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.split() == ["ok", str(len(names))], res.stderr[-2000:]


def test_no_plugin_imports_a_task_or_the_run():
    """Plugins see narrow interfaces (a WalkContext, a RunView, the hooks' LoopContext), never a task's code
    or the whole Run."""
    known = modules()
    bad = []
    for f in sorted((ROOT / "plugins").rglob("*.py")):
        for m in imported(f, f"plugins.{f.parent.name}.{f.stem}", known):
            if m.startswith(("stablefused.tasks", "stablefused.app", "stablefused.runs")):
                bad.append(f"{f.relative_to(ROOT)} imports {m}")
    assert not bad, bad


def test_no_task_file_over_260_lines():
    long = {f.name: n for f in (ROOT / "stablefused" / "tasks").glob("*.py")
            if (n := len(f.read_text().splitlines())) > 260}
    assert not long, long


# ------------------------------------------------------------------------------ the core names no plugin
def test_a_plugin_declares_which_parameters_index_the_run():
    """config.py checks sample/step indices of any plugin by what the plugin declares (``run_params``), not by
    parameter names it knows: a new visualizer with its own names gets the same checks."""
    from stablefused.config import validate
    from stablefused.errors import ConfigError
    from tests.conftest import compose_cfg

    @registry.register("visualizers", "arch_probe")
    class Probe:
        run_params = {"picks": "images", "at": "steps", "labels": "list"}

        def __init__(self, picks: list[int] | None = None, at: list[int] | None = None,
                     labels: list[str] | None = None):
            pass

        def __call__(self, view):
            return []

    cfg = compose_cfg("seeds=[0,1]", "prompts=[a red circle]", "steps=4", "+visualizers.arch_probe._selected_=true",
                      "+visualizers.arch_probe.picks=[1,5]", "+visualizers.arch_probe.at=[4]",
                      "+visualizers.arch_probe.labels=[]")
    try:
        validate(cfg)
        raise AssertionError("no ConfigError")
    except ConfigError as e:
        lines = str(e).splitlines()
    assert "visualizers.arch_probe.picks=[1,5]: this run has 2 images (indices 0..1)" in lines
    assert "visualizers.arch_probe.at=[4]: step indices count from 0 and must be < steps=4" in lines
    assert "visualizers.arch_probe.labels=[]: selects nothing; list at least one or set null for all" in lines
    validate(compose_cfg("seeds=[0,1]", "prompts=[a red circle]", "steps=4", "+visualizers.arch_probe._selected_=true",
                         "+visualizers.arch_probe.picks=[1]", "+visualizers.arch_probe.at=[3]"))


def test_metric_keys_are_what_the_metrics_returned():
    """A record lists its metric keys (``metrics``), so a metric may name a key like a setting (``time``) and
    a number the task adds (``strength``) is never taken for a score; manifests without the list still read."""
    from stablefused.scores import metric_keys

    new = {"type": "image", "strength": 0.5, "time": 0.25, "brightness": 0.7, "metrics": ["time", "brightness"]}
    assert metric_keys([new]) == ["time", "brightness"]
    old = {"type": "image", "strength": 0.5, "index": 3, "shapes_adherence/mean": 0.5, "keyframes": [0, 1]}
    assert metric_keys([old]) == ["shapes_adherence/mean"]


def test_core_modules_name_no_metric_or_visualizer():
    """No module of stablefused/ (the bundled shapes model's own code aside) holds a built-in metric's or
    visualizer's name in a string (docstrings and comments may mention them)."""
    registry.discover()
    names = set(registry.list_names("metrics")) | set(registry.list_names("visualizers"))
    found = []
    for f in sorted((ROOT / "stablefused").rglob("*.py")):
        if "shapes" in f.relative_to(ROOT).parts:
            continue
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                hit = [n for n in names if n in node.value]
                if hit:
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {hit[0]}")
    assert not found, found


# ------------------------------------------------------------------------------ one name, one meaning
def test_each_task_setting_belongs_to_one_task():
    """A task's own top-level keys (its conf/task/<task>.yaml, beyond the core ones it sets) are its alone,
    unless the task is built on the other (inpaint on img2img: the same source-image settings). ``frames``/
    ``fps`` meant per-segment/walk video in task=walk and per-video/MP4 in task=txt2video."""
    from stablefused.config import CORE_KEYS, task_keys
    from stablefused.tasks import get_task

    owners: dict[str, list[str]] = {}
    for f in sorted((ROOT / "conf" / "task").glob("*.yaml")):
        for key in task_keys(f.stem) - CORE_KEYS:
            owners.setdefault(key, []).append(f.stem)

    def related(a: str, b: str) -> bool:
        ta, tb = type(get_task(a)), type(get_task(b))
        return issubclass(ta, tb) or issubclass(tb, ta)

    shared = {k: v for k, v in owners.items() if any(not related(a, b) for a in v for b in v if a < b)}
    assert not shared, shared


def test_old_spellings_get_one_did_you_mean_line():
    from stablefused.app import override_problems
    from stablefused.config import validate
    from stablefused.errors import ConfigError
    from tests.conftest import compose_cfg

    assert override_problems(["task=walk", "frames=3", "fps=4"]) == [
        "frames: renamed; did you mean segment_frames? (task=walk)", "fps: renamed; did you mean walk_fps? (task=walk)"]
    assert override_problems(["experiment=zoom_walk", "frames=3"]) == [  # the experiment's task
        "frames: renamed; did you mean segment_frames? (task=walk)"]
    assert override_problems(["task=choice(walk,txt2video)", "frames=3"]) == [  # no one task
        "frames: renamed; did you mean segment_frames (task=walk) or video_frames (task=txt2video)?"]
    try:
        validate(compose_cfg("task=txt2video", "+frames=3"))
        raise AssertionError("no ConfigError")
    except ConfigError as e:
        assert "frames: renamed; did you mean video_frames? (task=txt2video)" in str(e).splitlines()
