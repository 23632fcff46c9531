"""The training script: a few steps of every stage run end to end for each world and denoiser, are bit-for-bit
reproducible from the seed, and resuming after the VAE stages (--vae-from) gives the same weights as the full
run; a companion trained with --text-from keeps the main model's text encoder."""

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

    for run, extra in (("a", []), ("b", ["--save-every", "1"])):
        train.main(["--out", str(tmp_path / run)] + ARGS + extra)
    _same(tmp_path / "a", tmp_path / "b")  # checkpoints on the way (how the shipped weights were trained) change nothing
    assert (tmp_path / "b-step2/unet/diffusion_pytorch_model.safetensors").exists()
    # the denoiser stage with the finished VAE loaded gives the same weights too
    train.main(["--out", str(tmp_path / "d"), "--vae-from", str(tmp_path / "a")] + ARGS)
    _same(tmp_path / "a", tmp_path / "d")


@pytest.mark.parametrize("preset", ["scenes", "scenes_flow"])
def test_scene_presets_train_loadable_models(tmp_path, preset):
    """A few steps of each scene preset (VAE stages, then UNet; or the SD3 transformer on that VAE) give a folder
    the family loads and samples; a --text-from companion keeps the text encoders bit for bit."""
    from safetensors.torch import load_file

    from stablefused.pipeline import Sampler
    from stablefused.scenes import evaluate, train

    small = ["--threads", "1", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "2", "--dataset-size", "32",
             "--no-eval", "--vae-channels", "8", "16", "--unet-channels", "32", "32", "--dit-layers", "1"]
    if preset == "scenes_flow":  # the preset takes scenes' VAE (the shipped one): here a tiny scenes run's
        assert train.PRESETS[preset][-2:] == ["--vae-from", str(train.BUNDLED / "scenes")]
        train.main(["scenes", "--out", str(tmp_path / "s")] + small)
        small += ["--vae-from", str(tmp_path / "s")]
    train.main([preset, "--out", str(tmp_path / "m"), "--save-every", "1"] + small)
    comps = evaluate.load(str(tmp_path / "m"))
    assert comps.family.name == ("sd" if preset == "scenes" else "sd3")
    if preset == "scenes_flow":  # a checkpoint loads as the final folder does: with the T5 length it was trained with
        assert evaluate.load(str(tmp_path / "m-step1")).family.max_sequence_length == comps.family.max_sequence_length == 4
        # its saved tokenizers (--whole-word-tokens) load with a word a token; scenes' splits "green triangle" in 9
        assert [len(t.tokenize("green triangle")) for t in (comps.tokenizer, comps.modules["tokenizer_2"])] == [2, 2]
    images = Sampler(comps).txt2img(["a red circle left of a blue square"], [0], 3.0, steps=2, progress=False).images
    assert images.shape == (1, 48, 48, 3)
    train.main([preset, "--out", str(tmp_path / "weak"), "--vae-from", str(tmp_path / "m"), "--text-from",
                str(tmp_path / "m")] + small)
    a, b = load_file(tmp_path / "m/text_encoder/model.safetensors"), load_file(tmp_path / "weak/text_encoder/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_vae_threads_keep_the_vae_of_a_single_threaded_run(tmp_path):
    """--vae-threads 1 with --threads 2: the VAE stages give the one-thread run's bytes (the VAE the companion
    presets load); what follows them runs on --threads, with or without the VAE stages (--vae-from)."""
    from safetensors.torch import load_file

    from stablefused.shapes import train

    vae = "vae/diffusion_pytorch_model.safetensors"
    small = ARGS[2:] + ["--vae-only"]
    split = ["--threads", "2", "--vae-threads", "1", *ARGS[2:]]  # as the scenes preset
    before = torch.get_num_threads()
    try:
        for run, threads in (("one", ["--threads", "1"]), ("two", ["--threads", "2"])):
            train.main(["--out", str(tmp_path / run), *threads, *small])
        train.main(["--out", str(tmp_path / "full"), *split])
        # the shipped scenes weights are a --vae-from run of its preset (UNet on two threads): the full run's bytes
        train.main(["--out", str(tmp_path / "from"), "--vae-from", str(tmp_path / "full"), *split])
    finally:
        torch.set_num_threads(before)
    one, two, split_vae = (load_file(tmp_path / run / vae) for run in ("one", "two", "full"))
    assert all(torch.equal(one[k], split_vae[k]) for k in one)
    assert not all(torch.equal(one[k], two[k]) for k in one)  # two threads round differently: the flag matters
    _same(tmp_path / "full", tmp_path / "from")


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


def test_single_others_is_checked_and_reaches_the_training_items():
    import numpy as np

    from stablefused.scenes.data import make_scene
    from stablefused.shapes import train

    for bad in (["--single-others", "1", "3", "--world", "scenes"], ["--single-others", "2", "1", "--world", "scenes"],
                ["--single-others", "1", "2"]):  # (the last: shapes has no single-object scenes)
        with pytest.raises(SystemExit):
            train.parse_args(bad + ["--out", "x"])
    args = train.parse_args(["--world", "scenes", "--single-others", "1", "2", "--out", "x"])
    args.world = train.world(args.world)
    _, prompts, masks = train.world_items(args, range(300))
    plain = train.parse_args(["--world", "scenes", "--out", "x"])
    plain.world = train.world(plain.world)
    _, same_prompts, plain_masks = train.world_items(plain, range(300))
    single = np.array([make_scene(i).category == "single" for i in range(300)])
    assert np.array_equal(masks[~single], plain_masks[~single])  # only single scenes change
    assert [p for p, s in zip(prompts, single) if not s] == [p for p, s in zip(same_prompts, single) if not s]
    assert masks[single].sum() > 1.15 * plain_masks[single].sum()  # (2.5 objects on average against 2: 1.24 here)
