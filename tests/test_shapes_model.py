"""The bundled ``shapes`` model: standard diffusers/transformers components, its VAE keeps every attribute,
and its images follow the prompt (measured with the shapes_adherence classifier at guidance 7.5 / 0 / -5)."""

import json

import pytest
import torch

from stablefused.paths import bundled_models_dir
from stablefused.shapes import data, evaluate

FOLDER = bundled_models_dir() / "shapes"
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason="bundled shapes model not present")


@pytest.fixture(scope="module")
def comps():
    return evaluate.load()


def test_shipped_as_small_safetensors_diffusers_folder():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"][1] == "CLIPTokenizer"


def test_loads_as_standard_components(comps):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(comps.tokenizer, CLIPTokenizer) and isinstance(comps.text_encoder, CLIPTextModel)
    assert isinstance(comps.unet, UNet2DConditionModel) and isinstance(comps.vae, AutoencoderKL)
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size
    assert comps.scheduler_config["_class_name"] == "DDIMScheduler"
    assert comps.unet.config.sample_size * comps.vae_scale_factor == data.IMAGE_SIZE
    assert comps.vae.config.scaling_factor != 1.0
    for word in data.VOCABULARY:  # every dataset word encodes and decodes back (most as one token)
        ids = comps.tokenizer(word).input_ids
        assert comps.tokenizer.decode(ids, skip_special_tokens=True).strip() == word
    assert sum(len(comps.tokenizer(w).input_ids) == 3 for w in data.VOCABULARY) >= len(data.VOCABULARY) - 2


def test_vae_reconstructions_keep_every_attribute(comps):
    acc = evaluate.vae_accuracy(comps, n=400)
    assert all(v >= 0.99 for v in acc.values()), acc


@pytest.fixture(scope="module")
def adherence(comps):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    images, records = evaluate.generate(comps, evaluate.EVAL_PROMPTS, evaluate.EVAL_SEEDS, evaluate.EVAL_SCALES, steps=20)
    assert images.shape == (len(records), data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    return evaluate.adherence(images, records)


def test_guidance_7_5_follows_the_prompt(adherence):
    a = adherence[7.5]
    assert a["color"] >= 0.95 and a["shape"] >= 0.85 and a["background"] >= 0.95, a


def test_guidance_0_is_near_chance(adherence):
    a, chance = adherence[0.0], evaluate.CHANCE
    for k in ("color", "shape", "background"):
        assert abs(a[k] - chance[k]) <= 0.25, (k, a)


def test_negative_guidance_avoids_the_prompted_colour(adherence):
    assert adherence[-5.0]["color"] < evaluate.CHANCE["color"], adherence[-5.0]


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_weights(tmp_path):
    """The one training command with its defaults (~40 min on this 2-core machine, one thread): byte-identical
    UNet, VAE and text encoder."""
    import hashlib

    from stablefused.shapes import train

    train.main(["--out", str(tmp_path / "shapes"), "--no-eval"])
    for f in FOLDER.rglob("*.safetensors"):
        sub = f.relative_to(FOLDER)
        assert hashlib.sha256((tmp_path / "shapes" / sub).read_bytes()).hexdigest() == \
            hashlib.sha256(f.read_bytes()).hexdigest(), sub
