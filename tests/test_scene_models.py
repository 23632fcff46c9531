"""The bundled scene models (``scenes``: UNet/epsilon/DDIM; ``scenes_flow``: SD3 transformer/flow matching):
diffusers folders of standard classes loaded like any
checkpoint, VAE reconstructions the judge passes, prompts followed at guidance 7.5 and not at 0; retraining
reproduces the shipped weights (slow). Their low-noise behaviour: tests/test_low_noise.py."""

import hashlib
import json

import pytest
import torch

from stablefused.paths import bundled_models_dir
from stablefused.scenes import data, evaluate

SCENE_MODELS = ("scenes", "scenes_flow")
pytestmark = pytest.mark.skipif(not all((bundled_models_dir() / m / "model_index.json").is_file() for m in SCENE_MODELS),
                                reason="bundled scene models not present")


@pytest.fixture(scope="module", params=SCENE_MODELS)
def model(request):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return request.param, evaluate.load(request.param)


def test_shipped_as_small_safetensors_diffusers_folders():
    for name, network, pipeline in (("scenes", "UNet2DConditionModel", "StableDiffusionPipeline"),
                                    ("scenes_flow", "SD3Transformer2DModel", "StableDiffusion3Pipeline")):
        folder = bundled_models_dir() / name
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024, name
        assert all(f.suffix == ".safetensors" for f in files if f.suffix in (".bin", ".pt", ".ckpt", ".pth", ".safetensors"))
        index = json.loads((folder / "model_index.json").read_text())
        key = "unet" if name == "scenes" else "transformer"
        assert index["_class_name"] == pipeline and index[key] == ["diffusers", network], index


def test_loads_through_its_family(model):
    name, comps = model
    assert comps.family.name == ("sd" if name == "scenes" else "sd3")
    assert comps.family.prediction_type == ("epsilon" if name == "scenes" else "flow")
    assert comps.network.config.sample_size * comps.vae_scale_factor == data.IMAGE_SIZE
    for word in data.VOCABULARY:  # every word of the world encodes and decodes back (scenes_flow: as one token)
        ids = comps.tokenizer(word).input_ids
        assert comps.tokenizer.decode(ids, skip_special_tokens=True).strip() == word
        assert name == "scenes" or len(ids) == 3, (word, ids)


def test_vae_reconstructions_pass_the_judge(model):
    assert evaluate.vae_accuracy(model[1], n=120)["overall"] >= 0.85  # misses: the smallest circles come back square-cornered


def test_guidance_draws_the_prompted_colour(model):
    """"a <colour> <shape>" beside a distractor (the ``colors`` category): at guidance 7.5 the named object is
    there far more often than unguided (240 prompts: scenes 0.90 vs 0.10, scenes_flow 0.88 vs 0.07)."""
    prompts = [data.make_scene(7_100_000 + i, category="colors").prompt for i in range(18)]
    rows = evaluate.table(model[1], scales=(7.5, 0.0), steps=20, prompts=prompts)
    guided, unguided = rows["guidance 7.5"]["colors"], rows["guidance 0"]["colors"]
    assert guided >= 0.3 and guided >= unguided + 0.2, rows


def _quality(name, _cache={}):
    if name not in _cache:  # the README's table: 240 fresh prompts, 20 steps (~2-4 min per model)
        _cache[name] = evaluate.table(evaluate.load(name), n=240, scales=(7.5, 3.0, 0.0, -5.0))
    return _cache[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENE_MODELS)
def test_quality_bar_leaves_room_for_guidance(name):
    """Issue 17's bar (``python -m stablefused.scenes.evaluate NAME``): overall 0.5-0.9 at guidance 7.5, guidance 0
    near chance, guidance -5 below chance on the prompted colours (scenes 0.58, scenes_flow 0.55)."""
    rows = _quality(name)
    chance = rows["chance (random scene)"]
    assert 0.5 <= rows["guidance 7.5"]["overall"] <= 0.9, rows
    assert abs(rows["guidance 0"]["overall"] - chance["overall"]) <= 0.1, rows
    assert rows["guidance -5"]["colors"] < chance["colors"], rows


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENE_MODELS)
def test_composition_below_single_objects_at_high_guidance(name):
    """Issue 17: at guidance 7.5 position and colour attribution clearly below single objects (240 prompts: scenes
    0.23 and 0.60 against 0.93, scenes_flow 0.20 and 0.57 against 0.85)."""
    guided = _quality(name)["guidance 7.5"]
    assert max(guided["position"], guided["color_attr"]) <= guided["single"] - 0.1, guided


def _sha(folder, sub):
    return hashlib.sha256((folder / sub).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SCENE_MODELS, "scenes_weak"])
def test_retraining_reproduces_the_shipped_weights(tmp_path, name):
    """The full preset command (1 h 58 min for scenes, 1 h 54 min for scenes_flow on scenes' shipped VAE, on
    this 2-core machine, minutes for the companion): byte-identical weights."""
    from stablefused.scenes import train

    train.main([name, "--out", str(tmp_path / name), "--no-eval"])
    shipped = bundled_models_dir() / name
    for f in shipped.rglob("*.safetensors"):
        sub = f.relative_to(shipped)
        assert _sha(tmp_path / name, sub) == _sha(shipped, sub), sub


def test_the_weak_companion_takes_the_scene_models_conditioning():
    """``scenes_weak`` (autoguidance's weak model: smaller, less trained) shares ``scenes``' text encoder and VAE
    byte for byte, loads as the autoguidance weak model and changes the images."""
    from safetensors.torch import load_file

    from stablefused.guidance import Guidance
    from stablefused.pipeline import Sampler

    weak_dir, main_dir = bundled_models_dir() / "scenes_weak", bundled_models_dir() / "scenes"
    for sub in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(weak_dir / sub), load_file(main_dir / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert sum(f.stat().st_size for f in weak_dir.rglob("*") if f.is_file()) <= 10 * 1024 * 1024
    sampler = Sampler(evaluate.load("scenes"))
    args = (["two yellow triangles", "a purple square"], [0, 1], 3.0)
    auto = Guidance.from_config({"rule": "autoguidance", "rule_params": {"weak_model": "scenes_weak"}})
    guided = sampler.txt2img(*args, steps=4, guidance=auto, progress=False).images
    plain = sampler.txt2img(*args, steps=4, progress=False).images
    assert guided.shape == plain.shape and abs(guided - plain).max() > 0.05
