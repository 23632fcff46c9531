"""Train a bundled scene model: ``python -m stablefused.scenes.train scenes|scenes_flow [--out DIR] [...]``.

Presets of the one training script (:mod:`stablefused.shapes.train`, which documents the stages) on the
compositional scenes (:mod:`stablefused.scenes.data`): ``scenes`` is a UNet with epsilon prediction and a DDIM
config (an SD 1.x-shaped model), ``scenes_flow`` an SD3-shaped transformer (two CLIP encoders, no T5) with
flow matching and ``FlowMatchEulerDiscreteScheduler``; ``scenes_weak`` is ``scenes``' autoguidance companion.
All share the VAE stages (same seed and args give the same VAE bytes) and train with prompt swapping at low
noise. Further arguments override the preset's.
"""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "models"

COMMON = ["--world", "scenes", "--max-tokens", "24", "--vae-steps", "1800", "--decoder-steps", "700", "--prompt-swap", "0.5",
          "--prompt-swap-sigma", "2.0"]
PRESETS = {
    # the UNet on two threads (0.58 s a step against 0.84 s on one), its VAE stages on one: the VAE bytes the
    # companion presets were trained on, whatever the thread count of the UNet
    "scenes": ["--name", "scenes", "--arch", "unet", "--unet-batch", "32", "--unet-steps", "9000", "--threads", "2",
               "--vae-threads", "1", *COMMON],
    # the transformer on scenes' VAE: the VAE stages' random stream follows the denoiser's initialisation, so a VAE
    # of its own would differ from scenes' by the architecture alone (the shipped one is scenes', byte for byte)
    # Its single-object scenes hold one or two unnamed objects beside the named one (scenes': zero to two), so that
    # "a circle" does not mean fewer objects than the data's average, which guidance turned into empty canvases.
    # Its tokenizer gives every word one token ("green" and "triangle" are 4 and 5 pieces in scenes'), so the
    # longest scene prompt is 14 tokens with its start and end and a 16-token window holds it (scenes': 24); the
    # shorter window makes a step 0.23 s instead of 0.28 (the transformer attends over the padded prompt in every
    # block; 0.25-0.29 s as this machine's speed varied), which buys 26,000 steps on both cores: 1 h 54 min alone
    "scenes_flow": ["--name", "scenes_flow", "--arch", "sd3", "--unet-batch", "32", "--unet-steps", "26000", "--unet-lr",
                    "6e-4", "--threads", "2", "--single-others", "1", "2", *COMMON, "--max-tokens", "16", "--whole-word-tokens",
                    "--vae-from", str(BUNDLED / "scenes")],
    # autoguidance's weak model (Karras et al. 2024): smaller (UNet 32/64 channels) and far less trained (600 steps
    # on 10,000 scenes), on the shipped scenes model's frozen text encoder and VAE, so it takes its conditioning
    "scenes_weak": ["--name", "scenes_weak", "--arch", "unet", "--unet-batch", "32", "--unet-steps", "600",
                    "--unet-channels", "32", "64", "--dataset-size", "10000", *COMMON,
                    "--vae-from", str(BUNDLED / "scenes"), "--text-from", str(BUNDLED / "scenes")],
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PRESETS:
        raise SystemExit(f"usage: python -m stablefused.scenes.train {{{'|'.join(PRESETS)}}} [training args]")
    from stablefused.shapes import train

    train.main(PRESETS[argv[0]] + argv[1:])


if __name__ == "__main__":
    main()
