"""The shapes training script: a few steps of every stage run end to end, are bit-for-bit reproducible from
the seed, and resuming (--vae-from, --finetune-decoder-of) gives the same weights as the full run."""

import pytest
import torch

SUBS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors")
ARGS = ["--threads", "1", "--vae-steps", "3", "--unet-steps", "3", "--decoder-steps", "2", "--dataset-size", "64",
        "--no-eval", "--vae-channels", "8", "16", "--unet-channels", "32", "32"]


def _same(a_dir, b_dir):
    from safetensors.torch import load_file

    for sub in SUBS:
        a, b = load_file(a_dir / sub), load_file(b_dir / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


@pytest.mark.slow
def test_training_is_deterministic_and_resumable(tmp_path):
    from stablefused.shapes import train

    for run in ("a", "b"):
        train.main(["--out", str(tmp_path / run)] + ARGS)
    _same(tmp_path / "a", tmp_path / "b")
    # stage 3 alone, on the full run's pre-stage-3 checkpoint, gives the full run's weights
    train.main(["--out", str(tmp_path / "c"), "--finetune-decoder-of", str(tmp_path / "a-step3")] + ARGS)
    _same(tmp_path / "a", tmp_path / "c")
    # stages 2-3 with the stage-1 VAE loaded give the same weights too
    train.main(["--out", str(tmp_path / "d"), "--vae-from", str(tmp_path / "a-step3")] + ARGS)
    _same(tmp_path / "a", tmp_path / "d")


def test_default_output_is_a_new_folder_not_the_shipped_weights(tmp_path, monkeypatch):
    from stablefused.shapes import train

    monkeypatch.chdir(tmp_path)
    bundled = train.BUNDLED_DIR
    out = train.parse_args([]).out
    assert (tmp_path / out).resolve() != bundled and out.startswith("runs/shapes_train/")
    assert train.parse_args(["--out", "x"]).out == "x"
    # writing over the shipped weights needs the explicit flag, whether asked via --out or by default
    assert train.parse_args(["--overwrite-bundled"]).out == str(bundled)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(bundled)])
