"""``clip_score`` plumbing on a tiny random CLIP built in code (no download), and its offline error."""

import numpy as np
import pytest
from PIL import Image

from stablefused import registry


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stablefused.text import build_word_tokenizer

    tok = build_word_tokenizer("a red blue circle square photo of".split(), model_max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(folder)
    return str(folder)


def test_clip_score_on_tiny_random_clip(tiny_clip_dir):
    metric = registry.create("metrics", "clip_score", model_id=tiny_clip_dir, device="cpu", batch_size=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    records = [{"prompt": p, "seed": i, "guidance_scale": 7.5} for i, p in enumerate(["a red circle", "a blue square", ""])]
    rows = metric(images, records)
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"clip_score/score"}
        assert isinstance(row["clip_score/score"], float) and 0.0 <= row["clip_score/score"] <= 100.0
    again = metric(images[:1], records[:1])
    assert again[0]["clip_score/score"] == pytest.approx(rows[0]["clip_score/score"], abs=1e-4)


def test_clip_score_offline_without_weights_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    cls = registry.get("metrics", "clip_score")
    with pytest.raises(RuntimeError) as err:
        cls(model_id="openai/clip-vit-base-patch32", local_files_only=True)
    msg = str(err.value)
    assert "\n" not in msg and "clip_score" in msg and "openai/clip-vit-base-patch32" in msg and "hf download" in msg
    with pytest.raises(RuntimeError, match="cannot load CLIP model"):
        cls(model_id=str(tmp_path / "no_such_folder"))
