"""Loading: a saved diffusers folder (the real from_pretrained path), safety of pickle weights, clear errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablefused.models import ModelLoadError, build_tiny_random, load_components, save_components
from stablefused.pipeline import Sampler


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    save_components(build_tiny_random(seed=3), folder)
    return folder


def model_cfg(**kw):
    base = dict(name="test", builtin=None, bundled=None, hub_id=None, path=None, allow_pickle=False,
                prediction_type=None)
    return {**base, **kw}


def test_saved_folder_loads_through_from_pretrained_and_samples_the_same(saved):
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "model_index.json").is_file()
    loaded = load_components(model_cfg(path=str(saved)), "cpu", "float32")
    built = build_tiny_random(seed=3)
    a = Sampler(loaded).txt2img(["a red circle"], [1], 6.0, steps=3, progress=False).images
    b = Sampler(built).txt2img(["a red circle"], [1], 6.0, steps=3, progress=False).images
    assert np.abs(a - b).max() <= 1e-6


def test_model_is_cached_and_scheduler_config_is_per_run(saved):
    a = load_components(model_cfg(path=str(saved)), "cpu", "float32")
    a.scheduler_config["steps_offset"] = 99
    b = load_components(model_cfg(path=str(saved)), "cpu", "float32")
    assert a.unet is b.unet
    assert b.scheduler_config["steps_offset"] != 99


def test_v_prediction_override(saved):
    comps = load_components(model_cfg(path=str(saved), prediction_type="v_prediction"), "cpu", "float32")
    assert comps.make_scheduler("EulerDiscreteScheduler").config.prediction_type == "v_prediction"


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelLoadError, match="refusing to load pickle weights.*model.allow_pickle=true"):
        load_components(model_cfg(path=str(ckpt)), "cpu", "float32")


def test_folder_with_only_pickle_weights_is_refused(saved, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(saved, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(unet), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    with pytest.raises(ModelLoadError, match="not a loadable diffusers folder"):
        load_components(model_cfg(path=str(folder)), "cpu", "float32")
    comps = load_components(model_cfg(path=str(folder), allow_pickle=True), "cpu", "float32")
    assert comps.unet is not None


def test_single_file_without_configs_fails_clearly(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, f)
    with pytest.raises(ModelLoadError) as e:
        load_components(model_cfg(path=str(f)), "cpu", "float32")
    assert "single-file checkpoint" in str(e.value) and "model.config=" in str(e.value)


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_components(model_cfg(path=str(tmp_path / "nope")), "cpu", "float32")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_components(model_cfg(name="sd15", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5"), "cpu", "float32")
    msg = str(e.value)
    assert "model=sd15" in msg and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    assert "model.path=" in msg and "\n" not in msg


def test_hub_id_with_no_network_fails_in_seconds(tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable (a closed local port): the clear one-line error comes
    in seconds, not after minutes of huggingface_hub retries."""
    import os
    import subprocess
    import sys

    # The libraries are imported before the clock starts: on a busy CPU their import alone can take
    # longer than the whole failure path; what is timed is the cache lookup, the hub check and the error.
    code = (
        "from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel\n"
        "from transformers import CLIPTextModel, CLIPTokenizer\n"
        "import time\n"
        "from stablefused.models import ModelLoadError, load_components\n"
        "t0 = time.monotonic()\n"
        "cfg = dict(name='sd15', builtin=None, bundled=None, hub_id='stablefused-test/no-such-model', path=None,"
        " allow_pickle=False, prediction_type=None)\n"
        "try:\n    load_components(cfg, 'cpu', 'float32')\nexcept ModelLoadError as e:\n    print('ERR', e)\n"
        "print('SECONDS', time.monotonic() - t0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="10",
               HF_HUB_DOWNLOAD_TIMEOUT="10")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("ERR ")]
    elapsed = float(next(x for x in res.stdout.splitlines() if x.startswith("SECONDS ")).split()[1])
    msg = line[4:]
    assert elapsed < 15, (elapsed, msg)
    assert "model=sd15" in msg and "hf download stablefused-test/no-such-model" in msg and "model.path=" in msg
    assert msg.endswith(".") and "\n" not in msg
