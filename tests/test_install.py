"""`pip install .` (a real wheel, not the editable checkout) still finds conf/ and the built-in plugins."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_plugins(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("stablefused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "stablefused/_conf/config.yaml" in names
    assert "stablefused/_conf/experiment/negative_guidance.yaml" in names
    assert "stablefused/_plugins/guidance_rule/cfg.py" in names
    assert "stablefused/models/shapes/unet/diffusion_pytorch_model.safetensors" in names
    assert "stablefused/models/shapes/tokenizer/tokenizer.json" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import stablefused, stablefused.paths as p, stablefused.registry as r;"
        "print(stablefused.__file__); print(p.config_dir()); print(sorted(r.list_names('guidance_rule')))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1] == str(site / "stablefused" / "_conf")
    assert "cfg" in out[2]
    res = subprocess.run([sys.executable, "-m", "stablefused", "model=tiny_random", "logger=none", "steps=2",
                          "progress=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "grid.png").is_file()
