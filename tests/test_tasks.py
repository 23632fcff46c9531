"""The task layer: modules import on their own, tasks own their keys, plugin selection, every problem at once,
reruns continue or refuse, a failing plugin costs no image."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from stablefused import registry
from stablefused.app import run
from stablefused.config import ConfigError, validate
from stablefused.errors import PluginError
from stablefused.runs import make_plugins
from stablefused.tasks import get_task, task_names
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["seeds=[0,1]", "steps=2", "guidance_scales=[0,5]", "prompts=[a red circle]"]


def test_every_module_imports_on_its_own():
    """Each stablefused module imported first, in a fresh module table: an import cycle hidden by imports
    inside functions, or a module that only works after another, fails here."""
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "stablefused").rglob("*.py") if "models" not in p.relative_to(ROOT).parts[1:2])
    code = (
        "import importlib, sys, traceback\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'stablefused' or k.startswith('stablefused.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert len(mods) > 20


def test_tasks_are_registered_by_name_and_have_configs():
    names = task_names()
    assert {"txt2img", "guidance_grid"} <= set(names)
    for name in names:
        assert get_task(name).name == name
        cfg = compose_cfg(f"task={name}")
        assert cfg.task == name
    with pytest.raises(ConfigError, match="task=txt2imgg: unknown task. Did you mean task=txt2img?"):
        get_task("txt2imgg")


def test_a_key_of_no_task_is_refused():
    cfg = compose_cfg("+frames_per_second=3")
    with pytest.raises(ConfigError, match="frames_per_second: unknown setting"):
        validate(cfg)


def test_empty_selection_really_removes_plugins_of_an_experiment():
    cfg = compose_cfg("experiment=negative_guidance", "visualizers=[]")
    assert "denoise_video" in cfg.visualizers  # the experiment still sets its parameters...
    validate(cfg)
    assert make_plugins(cfg, "visualizers") == {}  # ...but it is not selected, so it does not run
    cfg = compose_cfg("experiment=negative_guidance", "visualizers=[]", "recorders=[]")
    validate(cfg)  # no visualizer is left to ask for recorders
    assert make_plugins(cfg, "recorders") == {}
    cfg = compose_cfg("experiment=negative_guidance", "recorders=[]")
    with pytest.raises(ConfigError, match=r"visualizers.denoise_video needs recorders"):
        validate(cfg)
    assert set(registry.selected(compose_cfg("experiment=negative_guidance"), "visualizers")) == {
        "denoise_video", "stats_plot"}


def test_every_problem_is_reported_at_once():
    cfg = compose_cfg("steps=0", "batch_size=0", "device=gpu", "height=18", "guidance.rule=cgf")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    lines = str(e.value).splitlines()
    assert len(lines) == 5, lines
    for key in ("steps=0", "batch_size=0", "device='gpu'", "height=18", "guidance.rule"):
        assert sum(key in line for line in lines) == 1, key


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]


def test_rerun_same_config_continues_and_other_config_is_refused(tmp_path):
    first = run(compose_cfg(*SMALL), tmp_path)
    assert first.stats["model_calls"] > 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.png")}
    # interrupted run: one image lost (its file), the grid not written yet
    lost = sorted(before)[-1]
    (tmp_path / "images" / lost).unlink()
    again = run(compose_cfg(*SMALL, "batch_size=1", "progress=true"), tmp_path)  # batch/progress: same config
    assert again.stats["model_calls"] == 2  # only the missing image was made (2 steps, batch 1)
    after = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.png")}
    assert after == before  # byte for byte, the re-made image included
    images = [r for r in _records(tmp_path) if r["type"] == "image"]
    assert len(images) == 4 == len({r["index"] for r in images})  # no duplicate lines
    assert sum(r["type"] == "grid" for r in _records(tmp_path)) == 1

    with pytest.raises(ConfigError, match=r"holds another config \(guidance_scales: \[0, 5\] -> \[1, 5\]\).*overwrite=true"):
        run(compose_cfg(*SMALL[:2], "guidance_scales=[1,5]", SMALL[3]), tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.png")} == before  # untouched
    with pytest.raises(ConfigError, match="resume=false"):
        run(compose_cfg(*SMALL, "resume=false"), tmp_path)

    run(compose_cfg(*SMALL[:2], "guidance_scales=[1,5]", SMALL[3], "overwrite=true"), tmp_path)
    images = [r for r in _records(tmp_path) if r["type"] == "image"]
    assert sorted(r["guidance_scale"] for r in images) == [1, 1, 5, 5]
    assert len(list((tmp_path / "images").glob("*.png"))) == 4


def test_a_failing_metric_costs_no_image(tmp_path):
    plugin = tmp_path / "plugins" / "metrics"
    plugin.mkdir(parents=True)
    (plugin / "flaky.py").write_text(
        "from stablefused.registry import register\n"
        "@register('metrics', 'test_tasks_flaky')\n"
        "class Flaky:\n"
        "    calls = 0\n"
        "    def __call__(self, images, records):\n"
        "        Flaky.calls += 1\n"
        "        if Flaky.calls == 2:\n"
        "            raise RuntimeError('scorer crashed')\n"
        "        return [{'flaky': 1.0} for _ in images]\n")
    cfg = compose_cfg(*SMALL, "batch_size=2", f"plugin_dirs=[{tmp_path / 'plugins'}]")
    with open_dict(cfg):
        cfg.metrics = {"test_tasks_flaky": {"_selected_": True}}
    with pytest.raises(PluginError, match=r"metrics.test_tasks_flaky failed \(RuntimeError: scorer crashed\)"):
        run(cfg, tmp_path / "run")
    images = [r for r in _records(tmp_path / "run") if r["type"] == "image"]
    assert len(images) == 4 and all((tmp_path / "run" / r["path"]).is_file() for r in images)
    assert [r.get("flaky") for r in images] == [1.0, 1.0, None, None]  # batch 2's scores are missing, not its images
    assert (tmp_path / "run" / "grid.png").is_file()
