"""The README's "Write a plugin" example works as written."""

import json
import re
from pathlib import Path

from omegaconf import open_dict

from stablefused.app import run
from tests.conftest import compose_cfg

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_plugin_example_runs(tmp_path):
    text = README.read_text()
    code = re.search(r"```python\n(# plugins/metrics/brightness.py\n.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    (tmp_path / "plugins" / "metrics").mkdir(parents=True)
    (tmp_path / "plugins" / "metrics" / "brightness.py").write_text(code)
    cfg = compose_cfg(f"plugin_dirs=[{tmp_path / 'plugins'}]", "seeds=[0]", "steps=2", "guidance_scales=[0,5]")
    with open_dict(cfg):
        cfg.metrics = {"brightness": {"_selected_": True, "channel": None}}
    run(cfg, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    values = [r["brightness"] for r in recs if r["type"] == "image"]
    assert len(values) == 4 and all(0 <= v <= 1 for v in values)
    summary = json.loads((tmp_path / "run" / "metrics_by_guidance.json").read_text())
    assert set(summary) == {"0.0", "5.0"} and "brightness" in summary["5.0"]
    assert (tmp_path / "run" / "adherence.png").is_file()


def test_readme_install_says_how_to_get_cpu_torch():
    setup = README.read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup
    assert "torch==" not in setup  # no pin to one machine's local wheel
    assert "GPU" in setup  # and a GPU user keeps their own build


def test_readme_setup_makes_and_activates_a_venv_first(tmp_path):
    """The set-up block's first line, run as written, leaves the shell in a fresh virtual environment, and
    every pip install comes after it (nothing goes into the system Python)."""

    import subprocess

    setup = README.read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1).splitlines()
    first = block[0].split("  #")[0].strip()
    assert "venv" in first and "activate" in first, block[0]
    assert all("pip install" not in line for line in block[:1]) and any("pip install" in x for x in block[1:])
    out = subprocess.run(["bash", "-c", f"{first} && python -c 'import sys; print(sys.prefix)'"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (tmp_path / ".venv").resolve()
