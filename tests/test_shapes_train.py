"""The shapes training script: a few steps run end to end and are bit-for-bit reproducible from the seed."""

import pytest
import torch


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from stablefused.shapes import train

    args = ["--threads", "1", "--vae-steps", "3", "--unet-steps", "3", "--dataset-size", "64", "--no-eval",
            "--vae-channels", "8", "16", "--unet-channels", "32", "32"]
    for run in ("a", "b"):
        train.main(["--out", str(tmp_path / run)] + args)
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "a" / sub), load_file(tmp_path / "b" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
