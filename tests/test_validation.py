"""Hardening of config validation: every bad input is one clear line (ConfigError) before any model loads;
NaN/inf never reaches a PNG silently; plugin parameter values are checked; plugin_dirs imports only what it
names; the CLI points to the right fix (did-you-mean, corrupt files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stablefused.config import validate
from stablefused.errors import USER_ERRORS, ConfigError, NonFiniteError, first_line
from stablefused.models import hub_files_missing
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()
NO_MPS = not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
SD15_MISSING = hub_files_missing("stable-diffusion-v1-5/stable-diffusion-v1-5", "model_index.json")

# (overrides, a fragment of the one line that must name the problem); tiny_random model, steps=20 by default.
BAD = [
    # 5. NaN / inf / absurd numbers
    (["guidance_scales=[nan]"], "guidance_scales: item nan is not a finite number"),
    (["guidance_scales=[inf]"], "guidance_scales: item inf is not a finite number"),
    (["guidance_scales=[7.5,-inf]"], "guidance_scales: item -inf is not a finite number"),
    (["guidance_scales=[1e30]"], "guidance_scales: item 1e+30 is out of range; use |w| <= 10000"),
    (["guidance_scales=[7.5,-20000]"], "guidance_scales: item -20000"),
    (["eta=nan"], "eta=nan: must be in [0, 1]"),
    (["eta=inf"], "eta=inf: must be in [0, 1]"),
    (["eta=-0.5"], "eta=-0.5: must be in [0, 1]"),
    (["eta=2"], "eta=2: must be in [0, 1]"),
    (["guidance=cutoff", "guidance.params.frac=nan"], "guidance.params.frac=nan: must be a finite number"),
    (["guidance=linear", "guidance.params.end=inf"], "guidance.params.end=inf: must be a finite number"),
    (["guidance=cosine", "guidance.params.start=1e30"], "guidance.params.start=1e+30: must be in [-100, 100]"),
    (["guidance=warmup", "guidance.params.start=-inf"], "guidance.params.start=-inf: must be a finite number"),
    (["guidance.rule=apg", "+guidance.rule_params.eta=nan"], "guidance.rule_params.eta=nan: must be a finite number"),
    (["guidance.rule=rescaled_cfg", "+guidance.rule_params.phi=nan"], "guidance.rule_params.phi=nan: must be a finite"),
    (["+scheduler.overrides.beta_end=nan"], "scheduler.overrides.beta_end=nan: not a finite number"),
    (["+scheduler.overrides.beta_start=-inf"], "scheduler.overrides.beta_start=-inf: not a finite number"),
    # 7. out of range
    (["steps=2000"], "steps=2000: more than the 1000 timesteps model tiny_random's scheduler was trained with"),
    (["steps=1001"], "use steps <= 1000"),
    (["model=shapes", "steps=5000"], "steps=5000: more than the 1000 timesteps model shapes"),
    (["steps=1.5"], "steps=1.5: must be an integer"),
    (["seeds=[-1]"], "seeds: -1 is out of range; seeds must be in [0, 2**64)"),
    (["seeds=[18446744073709551616]"], "seeds: 18446744073709551616 is out of range"),
    (["seeds=[0,99999999999999999999999]"], "seeds: 99999999999999999999999 is out of range"),
    (["width=100000"], "width=100000: far above model tiny_random's 16 px (more than 8x); use width <= 128"),
    (["model=shapes", "width=512", "height=512"], "width=512: far above model shapes's 32 px (more than 8x); use width <= 256"),
    (["height=128", "width=128", "max_pixels=60000"],
     "height=128, width=128: 4 image(s) per batch of this size are 65,536 pixels, above max_pixels=60,000"),
    (["model=sd15", "height=2048", "width=2048"], "8 image(s) per batch of this size are 33,554,432 pixels, above max_pixels=8,388,608"),
    (["height=64", "width=64", "max_pixels=1000"], "above max_pixels=1,000"),
    (["max_pixels=0"], "max_pixels=0: must be >= 1"),
    (["max_pixels=lots"], "max_pixels='lots': must be an integer"),
    (["height=4"], "height=4: far below model tiny_random's 16 px"),
    (["width=4"], "width=4: far below model tiny_random's 16 px"),
    (["model=shapes", "height=8"], "height=8: far below model shapes's 32 px (a quarter or less"),
    (["dtype=float16", "device=cpu"], "dtype=float16: half precision is not supported on the CPU; use dtype=float32"),
    # 8. plugin parameter values
    (["guidance=cutoff", "guidance.params.frac=-3"], "guidance.params.frac=-3: must be in [0, 1]"),
    (["guidance=cutoff", "guidance.params.frac=1.5"], "guidance.params.frac=1.5: must be in [0, 1]"),
    (["guidance=cutoff", "guidance.params.frac=abc"], "guidance.params.frac='abc': must be a finite number"),
    (["guidance=warmup", "guidance.params.frac=2"], "guidance.params.frac=2: must be in [0, 1]"),
    (["guidance=warmup", "guidance.params.start=true"], "guidance.params.start=True: must be a finite number"),
    (["guidance=interval", "guidance.params.sigma_lo=9"], "guidance.params.sigma_lo=9: must be below sigma_hi=5.42"),
    (["guidance=interval", "guidance.params.sigma_lo=1", "guidance.params.sigma_hi=1"], "sigma_lo=1: must be below sigma_hi=1"),
    (["guidance=interval", "guidance.params.sigma_hi=-1"], "guidance.params.sigma_hi=-1: must be >= 0"),
    (["guidance.rule=apg", "+guidance.rule_params.space=bogus"], "guidance.rule_params.space='bogus': must be one of x0, prediction"),
    (["guidance.rule=apg", "+guidance.rule_params.momentum=abc"], "guidance.rule_params.momentum='abc': must be a finite number"),
    (["guidance.rule=apg", "+guidance.rule_params.momentum=5"], "guidance.rule_params.momentum=5: must be in [-1, 1]"),
    (["guidance.rule=apg", "+guidance.rule_params.r=-1"], "guidance.rule_params.r=-1: must be >= 0"),
    (["guidance.rule=rescaled_cfg", "+guidance.rule_params.phi=2"], "guidance.rule_params.phi=2: must be in [0, 1]"),
    (["guidance.rule=cfg_zero_star", "+guidance.rule_params.zero_steps=-1"], "guidance.rule_params.zero_steps=-1: must be >= 0"),
    (["guidance.rule=cfg_zero_star", "+guidance.rule_params.zero_steps=1.5"], "guidance.rule_params.zero_steps=1.5: must be an integer"),
    (["recorders=[x0]", "recorders.x0.samples=-1"], "recorders.x0.samples=-1: must be >= 0"),
    (["recorders=[x0]", "recorders.x0.samples=[0,-1]"], "recorders.x0.samples=[0,-1]: must be >= 0 (each item)"),
    (["recorders=[x0]", "recorders.x0.samples=[a]"], "recorders.x0.samples=['a']: must be"),
    (["recorders=[x0]", "recorders.x0.every=0"], "recorders.x0.every=0: must be >= 1"),
    (["recorders=[x0]", "recorders.x0.every=50"], "recorders.x0.every=50: larger than steps=20"),
    (["recorders=[latents]", "recorders.latents.dtype=float64"], "recorders.latents.dtype='float64': must be one of float16, bfloat16, float32 or null"),
    (["recorders=[noise]", "recorders.noise.per=batch"], "recorders.noise.per='batch': must be one of step, call"),
    (["recorders=[stats]", "recorders.stats.log=maybe"], "recorders.stats.log='maybe': must be true or false"),
    (["recorders=[attention]", "recorders.attention.steps=[0,25]"], "recorders.attention.steps=[0,25]: step indices count from 0 and must be < steps=20"),
    (["recorders=[attention]", "recorders.attention.every=2.5"], "recorders.attention.every=2.5: must be an integer"),
    (["recorders=[x0]", "visualizers=[step_strip]", "visualizers.step_strip.count=0"], "visualizers.step_strip.count=0: must be >= 1"),
    (["recorders=[x0]", "visualizers=[step_strip]", "visualizers.step_strip.source=x1"], "visualizers.step_strip.source='x1': must be one of x0, x_t, x_prev"),
    (["recorders=[x0]", "visualizers=[step_strip]", "visualizers.step_strip.steps=[30]"], "visualizers.step_strip.steps=[30]: step indices count from 0"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.fps=0"], "visualizers.denoise_video.fps=0: must be in [1, 120]"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.layout=diagonal"], "visualizers.denoise_video.layout='diagonal': must be one of grid, square, sample"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.panels=[x_t,noise]"], "visualizers.denoise_video.panels=['x_t','noise']: must be"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.sample=-2"], "visualizers.denoise_video.sample=-2: must be >= 0"),
    (["recorders=[stats]", "visualizers=[stats_plot]", "visualizers.stats_plot.x=time"], "visualizers.stats_plot.x='time': must be one of step, t, sigma"),
    (["recorders=[attention]", "visualizers=[attention_maps]", "visualizers.attention_maps.alpha=1.5"], "visualizers.attention_maps.alpha=1.5: must be in [0, 1]"),
    (["metrics=[clip_score]", "metrics.clip_score.batch_size=0"], "metrics.clip_score.batch_size=0: must be >= 1"),
    (["metrics=[clip_score]", "metrics.clip_score.device=tpu"], "metrics.clip_score.device='tpu': must be one of auto, cpu, cuda, mps"),
    (["metrics=[clip_score]", "metrics.clip_score.local_files_only=true", "metrics.clip_score.model_id=nobody/no-such-clip"],
     "metrics.clip_score.model_id='nobody/no-such-clip': CLIP weights not downloaded"),
    # 9. plugin_dirs
    (["plugin_dirs=/nonexistent_stablefused_dir"], "plugin_dirs: /nonexistent_stablefused_dir is not a folder"),
    (["plugin_dirs=[1]"], "plugin_dirs: item 1 is not a folder path"),
    # 10 / 13. model files, checked without loading
    (["model.builtin=null", "model.path=/nonexistent/model"], "model.path=/nonexistent/model: no such folder"),
    (["model.builtin=null", "model.path=/nonexistent/x.safetensors"], "model.path=/nonexistent/x.safetensors: no such file"),
    (["model=shapes", "model.bundled=nosuch"], "model.bundled=nosuch: no such folder"),
    (["combine=cross"], "combine='cross': must be product or zip"),
    # found by fuzzing every key with wrong types (each was a TypeError/AttributeError traceback or silent)
    (["recorders=[x0]", "recorders.x0.samples=[0,4]"], "recorders.x0.samples=[0,4]: this run has 4 images (indices 0..3)"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.rows=[4]"],
     "visualizers.denoise_video.rows=[4]: this run has 4 rows"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.panels=null"],
     "visualizers.denoise_video.panels=None: must be"),
    (["recorders=[x0]", "visualizers=[step_strip]", "visualizers.step_strip.source=[x0]"], "visualizers.step_strip.source=['x0']: must be one of"),
    (["model.builtin=x"], "model.builtin='x': not a model built in code; those are"),
    (["model.allow_pickle=maybe"], "model.allow_pickle='maybe': must be true or false"),
    (["name=[]"], "name=[]: must be a non-empty string"),
    (["scheduler.overrides=5"], "scheduler.overrides=5: must be a mapping"),
    (["scheduler.cls=1"], "scheduler.cls=1: must be a diffusers scheduler class name"),
    (["model.size_multiple=x"], "model.size_multiple='x': must be an integer >= 1"),
    (["model.height=[16]"], "model.height=[16]: must be an integer >= 1"),
    (["model.example_prompts=[1]"], "model.example_prompts: item 1 is not a string"),
    (["model.example_prompts=3"], "model.example_prompts=3: must be a list of strings"),
    (["recorders=[x0]", "recorders.x0.samples=[]"], "recorders.x0.samples=[]: selects nothing; list at least one or set null for all"),
    (["recorders=[latents,x0]", "visualizers=[denoise_video]", "visualizers.denoise_video.panels=[]"],
     "visualizers.denoise_video.panels=[]: selects nothing; list at least one"),
    (["recorders=[stats]", "visualizers=[stats_plot]", "visualizers.stats_plot.stats=[]"], "visualizers.stats_plot.stats=[]: selects nothing"),
]
if NO_CUDA:
    BAD += [(["device=cuda"], "device=cuda: no CUDA device is available here; use device=cpu or device=auto")]
    if NO_MPS:
        BAD += [(["dtype=float16"], "dtype=float16: half precision is not supported on the CPU (device=auto found no GPU)"),
                (["device=mps"], "device=mps: no MPS device is available here")]
if SD15_MISSING:
    BAD += [(["model=sd15"], "model=sd15: stable-diffusion-v1-5/stable-diffusion-v1-5 is not downloaded and the hub is offline")]


@pytest.mark.parametrize("overrides, fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    lines = str(e.value).splitlines()
    assert any(fragment in line for line in lines), str(e.value)
    assert all(line and "Traceback" not in line and len(line) < 400 for line in lines)


def test_at_least_60_distinct_bad_inputs():
    assert len({tuple(o) for o, _ in BAD}) >= 60


def test_good_values_still_pass():
    for overrides in (["guidance_scales=[-7.5,0,1,12,10000]", "eta=1", "seeds=[0,18446744073709551615]"],
                      ["guidance=interval", "guidance.params.sigma_lo=0", "recorders=[x0,stats]", "recorders.x0.samples=3"],
                      ["guidance.rule=apg", "+guidance.rule_params.momentum=-0.5", "+guidance.rule_params.space=prediction"],
                      ["recorders=[attention]", "visualizers=[attention_maps]", "recorders.attention.steps=[0,19]",
                       "recorders.attention.layers=up_blocks", "steps=20"],
                      ["height=8", "width=64", "steps=1000"]):
        validate(compose_cfg(*overrides))


def test_every_problem_at_once_before_loading():
    """The README's real-model command on a CPU machine, offline: every problem in one run, in seconds."""
    if not (NO_CUDA and SD15_MISSING):
        pytest.skip("needs a machine without CUDA and without SD 1.5 in the cache")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("model=sd15", "device=cuda", "metrics=[clip_score]", "eta=nan", "guidance_scales=[1e9]"))
    lines = str(e.value).splitlines()
    assert time.perf_counter() - t0 < 10
    assert [k for k in ("device=cuda", "model=sd15", "metrics.clip_score.model_id", "eta=nan", "guidance_scales")
            if not any(line.startswith(k) for line in lines)] == []
    assert len(lines) == 5


def test_grid_variant_values_name_their_key_path():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("task=guidance_grid", "guidance=rules", "guidance.grid.3.rule_params.momentum=-5"))
    assert "guidance.grid[3].rule_params.momentum=-5: must be in [-1, 1]" in str(e.value)


# ------------------------------------------------------------------------------ 5. NaN in the loop / output
class _PoisonAt:
    """A hook that turns the latents into NaN after loop iteration ``at``."""

    def __init__(self, at: int):
        self.at = at

    def before_loop(self, ctx):
        return None

    def on_step(self, state):
        return torch.full_like(state.x_prev, float("nan")) if state.index == self.at else None

    def after_loop(self, ctx, latents):
        return None


def test_nonfinite_latents_stop_with_one_line(tiny):
    from stablefused.pipeline import Sampler
    from stablefused.sampling import _FiniteCheck

    s = Sampler(tiny)
    with pytest.raises(NonFiniteError) as e:
        s.txt2img(["a red circle"], [0], 7.5, steps=12, height=16, width=16, hooks=[_PoisonAt(1)], progress=False)
    msg = str(e.value)
    # read every 10 steps (not every step: no per-step GPU sync), so the window is steps 1..10
    assert "\n" not in msg and "between steps 1 and 10 of 12" in msg and "dtype=float32 or bfloat16" not in msg
    assert NonFiniteError in USER_ERRORS
    with pytest.raises(NonFiniteError, match="between steps 11 and 12 of 12"):  # the last step is always read
        s.txt2img(["a red circle"], [0], 7.5, steps=12, height=16, width=16, hooks=[_PoisonAt(10)], progress=False)
    check = _FiniteCheck(torch.device("cpu"), every=10, dtype=torch.float16)
    check.update(torch.tensor([float("inf")]), 0, 5)  # not read yet: no error, no sync
    with pytest.raises(NonFiniteError, match="float16 overflow in the UNet; try dtype=float32 or bfloat16"):
        check.update(torch.zeros(1), 4, 5, last=True)


def test_nonfinite_decode_is_an_error_not_a_black_png(tiny):
    from stablefused.pipeline import Sampler

    with pytest.raises(NonFiniteError, match="decode: the VAE returned NaN/inf"):
        Sampler(tiny).decode(torch.full((1, 4, 8, 8), float("nan")))


def test_manifest_writes_nan_as_null(tmp_path):
    from stablefused.outputs import Manifest

    m = Manifest(tmp_path / "manifest.jsonl")
    m.append({"score": float("nan"), "x": [np.float32("inf"), 1.0]})
    line = (tmp_path / "manifest.jsonl").read_text().strip()
    assert json.loads(line) == {"score": None, "x": [None, 1.0]} and "NaN" not in line and "Infinity" not in line


# ------------------------------------------------------------------------------ 7. long prompts
def test_long_prompt_warns_once_with_dropped_count(tiny, caplog):
    from stablefused.pipeline import Sampler

    s = Sampler(tiny)
    long = " ".join(["a red circle on the black square"] * 4)  # 28 words + BOS/EOS = 30 tokens, window 16
    with caplog.at_level("WARNING", logger="stablefused"):
        s.encode([long, "a red circle"])
        s.encode([long])
    warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warned) == 1 and "30 tokens, the text encoder reads 16; the last 14 are dropped" in warned[0]


# ------------------------------------------------------------------------------ 9. plugin_dirs
SENTINEL = "raise RuntimeError('imported a file that plugin_dirs does not name')\n"


def test_plugin_dirs_string_is_one_folder_and_imports_only_it(tmp_path):
    from stablefused import registry

    mine = tmp_path / "mine"
    (mine / "metrics").mkdir(parents=True)
    (mine / "metrics" / "sentinel_ok.py").write_text(
        "from stablefused.registry import register\n\n@register('metrics', 'sentinel_ok_plugin')\n"
        "class SentinelOk:\n    def __call__(self, images, records):\n        return [{} for _ in images]\n")
    (mine / "notakind").mkdir()
    (mine / "notakind" / "evil.py").write_text(SENTINEL)  # below the named folder, but not a plugin kind
    (tmp_path / "sibling" / "metrics").mkdir(parents=True)
    (tmp_path / "sibling" / "metrics" / "evil.py").write_text(SENTINEL)
    validate(compose_cfg(f"plugin_dirs={mine}"))  # a string, not a list
    assert "sentinel_ok_plugin" in registry.list_names("metrics")
    assert registry.plugin_dirs(str(mine)) == [str(mine)]


# ------------------------------------------------------------------------------ 10. corrupt files
def test_corrupt_safetensors_says_corrupt_not_set_config(tmp_path):
    from stablefused.errors import ModelLoadError
    from stablefused.models import load_components

    text = tmp_path / "text.safetensors"
    text.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    real = tmp_path / "real.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1000)}, str(real))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(real.read_bytes()[:-100])
    tiny_file = tmp_path / "tiny.safetensors"
    tiny_file.write_bytes(b"abc")
    cases = {text: "not a safetensors file", cut: "truncated: the header lists 4", tiny_file: "too short"}
    for path, fragment in cases.items():
        with pytest.raises(ConfigError) as e:
            validate(compose_cfg("model.builtin=null", f"model.path={path}"))
        assert fragment in str(e.value) and "model.config" not in str(e.value), str(e.value)
        cfg = compose_cfg("model.builtin=null", f"model.path={path}")
        with pytest.raises(ModelLoadError) as e:
            load_components(cfg.model, "cpu", "float32")
        assert fragment in str(e.value) and "model.config" not in str(e.value)


def test_quoted_errors_are_not_cut_mid_word():
    text = "word " * 100
    short = first_line(text, 50)
    assert len(short) <= 50 and short.endswith("word...") and first_line("one\ntwo") == "one"


# ------------------------------------------------------------------------------ 10. CLI pre-check
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "stablefused", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_misspelt_key_and_options_are_one_line_each():
    p = _cli("guidance_scale=5", "scheduler=eulr", "model=nosuch", "recorders=[x0,stat]", "hydra/launcher=basic")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert lines == [
        "error: guidance_scale: unknown setting. Did you mean guidance_scales?",
        "error: scheduler=eulr: no such scheduler option (conf/scheduler/eulr.yaml). Closest: euler.",
        "error: model=nosuch: no such model option (conf/model/nosuch.yaml). Options: flux_dev, flux_schnell, modelscope, sd15, sd21, sd_turbo, shapes, tiny_flux, tiny_flux_schnell, tiny_random, zeroscope.",
        "error: recorders=stat: no such recorders option (conf/recorders/stat.yaml). Closest: stats.",
    ]


def test_override_precheck_leaves_valid_overrides_to_hydra():
    from stablefused.app import override_problems

    assert override_problems(["-m", "scheduler=ddim,euler", "recorders=[x0,stats]", "visualizers=[]", "metrics=null",
                              "+guidance.rule_params.eta=0", "~logger", "hydra/launcher=basic", "task=guidance_grid",
                              "experiment=negative_guidance", "guidance.rule=apg", "model.path=/x", "++foo=1",
                              "scheduler=choice(ddim,euler)", "--cfg", "job"]) == []
    assert override_problems(["-cn", "other", "nosuch=1"]) == []


@pytest.mark.skipif(not (NO_CUDA and SD15_MISSING), reason="needs a CPU-only machine without SD 1.5 downloaded")
def test_cli_readme_real_model_command_reports_all_three_problems():
    t0 = time.perf_counter()
    p = _cli("model=sd15", "device=cuda", "metrics=[clip_score]", "logger=none")
    took = time.perf_counter() - t0
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if "device=cuda" in line or "model=sd15" in line
              or "metrics.clip_score" in line]
    assert p.returncode == 2 and len(errors) == 3 and "Traceback" not in out, out
    assert took < 60
