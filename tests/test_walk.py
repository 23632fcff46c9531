"""Latent walks (task=walk, plugins/walkers): keyframes equal text-to-image, exact frame counts, slerp keeps
the norm, frames independent of chunking, resume gives the same video, story/audio/circle/random walkers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablefused import registry
from stablefused.app import run
from stablefused.errors import ConfigError
from stablefused.walkers import Keys, Walk, Walker, default_keyframes, lerp, slerp
from tests.conftest import compose_cfg

P1, P2, P3 = "a red circle", "a blue square on black", "a small green triangle"
BASE = ["task=walk", "steps=3", "segment_frames=3"]


def walk_cfg(*overrides):
    return compose_cfg(*BASE, *overrides)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def frame_records(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "manifest.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "frame"]


def video_frames(path):
    import imageio.v2 as iio2

    with iio2.get_reader(str(path), format="FFMPEG") as reader:
        return np.stack([np.asarray(f) for f in reader])


def walker(name, **params):
    return registry.create("walkers", name, **params)


def plan(name, prompts, seeds, frames, loop, **params):
    w = walker(name, **params)
    walk = Walk(default_keyframes(prompts, seeds), list(seeds), frames, loop, 12.0)
    return w, walk, w.plan(walk, w.keyframes(walk))


@pytest.fixture(scope="module")
def sd15_scheduler_model(tmp_path_factory):
    """The tiny model saved with an SD-1.5 scheduler config (PNDM, scaled_linear, steps_offset 1, leading)."""
    from diffusers import PNDMScheduler

    from stablefused.models import _scheduler_dict, build_tiny_random, save_components

    comps = build_tiny_random()
    comps.scheduler_config = _scheduler_dict(PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True, num_train_timesteps=1000))
    return save_components(comps, tmp_path_factory.mktemp("sd15sched") / "model")


# ------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", ["interpolate", "random", "circle"])
def test_frame_count_exact_no_duplicate_at_joins_or_seam(name):
    for k, frames in [(2, 5), (3, 4), (4, 1)]:
        prompts, seeds = [P1, P2, P3, P1][:k], list(range(k))
        for loop in (False, True):
            w, walk, fr = plan(name, prompts, seeds, frames, loop)
            closed = loop or w.closed
            assert len(fr) == (k * frames if closed else (k - 1) * frames + 1)
            assert [f.index for f in fr] == list(range(len(fr)))
            # where on the path each frame is: keyframe j sits at segment j position 0 (or the end of the
            # last segment in an open walk); every point appears once
            points = [(f.segment + f.position) % (k if closed else k + 1) for f in fr]
            assert len(set(points)) == len(points)
            keyframe_frames = [f.index for f in fr if f.position == 0 or f.position == 1]
            expected = [j * frames for j in range(k if closed else k - 1)] + ([] if closed else [len(fr) - 1])
            assert keyframe_frames == expected
            if closed:  # the seam: the last frame is one step before the start, not the start again
                assert fr[-1].segment == k - 1 and fr[-1].position == pytest.approx(1 - 1 / frames)


def test_frame_count_on_disk_and_video(tmp_path):
    r = run(walk_cfg(f"prompts=[{P1},{P2},{P3}]", "seeds=[1,2,3]", "segment_frames=3"), tmp_path / "open")
    assert len(frame_records(tmp_path / "open")) == 7 == len(list((tmp_path / "open" / "frames").glob("*.png")))
    assert len(video_frames(tmp_path / "open" / "walk.mp4")) == 7
    assert r.images == []  # frames are not kept in memory
    run(walk_cfg(f"prompts=[{P1},{P2},{P3}]", "seeds=[1,2,3]", "segment_frames=3", "loop=true"), tmp_path / "loop")
    recs = frame_records(tmp_path / "loop")
    assert len(recs) == 9 and [r["frame"] for r in recs] == list(range(9))
    # no duplicate frame at the seam: the last frame is not the first keyframe again
    last, first = pixels(tmp_path / "loop" / recs[-1]["path"]), pixels(tmp_path / "loop" / recs[0]["path"])
    assert not np.array_equal(last, first)
    assert recs[-1]["keyframes"] == [2, 0] and recs[3]["keyframes"] == [1] and recs[3]["position"] == 0


# ------------------------------------------------------------------------------------------- keyframes = txt2img
@pytest.mark.parametrize("setup", ["tiny", "sd15_scheduler", "euler_ancestral"])
def test_keyframe_frames_equal_txt2img_pixel_for_pixel(tmp_path, setup, request):
    extra = []
    if setup == "sd15_scheduler":
        extra = [f"model.path={request.getfixturevalue('sd15_scheduler_model')}"]
    elif setup == "euler_ancestral":  # a stochastic scheduler: the frame's generator matters too
        extra = ["scheduler=euler_ancestral"]
    steps = ["steps=5"]
    run(compose_cfg(f"prompts=[{P1},{P2}]", "seeds=[11,22]", "combine=zip", "batch_size=1", *steps, *extra),
        tmp_path / "t2i")
    t2i = {(r["prompt"], r["seed"]): r["path"] for r in
           [json.loads(x) for x in (tmp_path / "t2i" / "manifest.jsonl").read_text().splitlines()]
           if r["type"] == "image"}
    run(walk_cfg(f"prompts=[{P1},{P2}]", "seeds=[11,22]", "segment_frames=4", *steps, *extra), tmp_path / "walk")
    recs = frame_records(tmp_path / "walk")
    for i, key in ((0, (P1, 11)), (4, (P2, 22))):
        assert recs[i]["prompt_weights"] == [1.0]
        assert np.array_equal(pixels(tmp_path / "walk" / recs[i]["path"]), pixels(tmp_path / "t2i" / t2i[key]))
    # and the frames between are neither keyframe
    mid = pixels(tmp_path / "walk" / recs[2]["path"])
    assert not np.array_equal(mid, pixels(tmp_path / "walk" / recs[0]["path"]))
    assert not np.array_equal(mid, pixels(tmp_path / "walk" / recs[4]["path"]))


# ------------------------------------------------------------------------------------------- slerp
def test_slerp_keeps_the_noise_norm_lerp_does_not():
    g = [torch.Generator().manual_seed(s) for s in (1, 2)]
    a, b = (torch.randn(4, 64, 64, generator=x) for x in g)
    ratio = lambda x: float(x.norm() / a.norm())  # noqa: E731
    assert ratio(slerp(a, b, 0.5)) >= 0.99
    assert 0.68 <= ratio(lerp(a, b, 0.5)) <= 0.74  # ~1/sqrt(2): lerp's midpoint is washed-out noise
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # the interpolate walker's noise is slerp's: every frame keeps the norm
    w, walk, fr = plan("interpolate", [P1, P2], [1, 2], 8, False)
    keys = Keys(torch.stack([a, b]), torch.zeros(2, 3, 4), [1, 2], None)
    norms = w.noise(fr, keys).flatten(1).norm(dim=1) / a.norm()
    assert float(norms.min()) >= 0.99


# ------------------------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("scheduler", ["default", "dpm_sde"])  # dpm_sde: per-frame Brownian noise seeds
def test_frame_depends_only_on_config_and_index_chunks_of_1_and_8(tmp_path, scheduler):
    common = [f"prompts=[{P1},{P2}]", "seeds=[1,2]", "segment_frames=5", "loop=true", f"scheduler={scheduler}"]
    run(walk_cfg(*common, "batch_size=1"), tmp_path / "b1")
    run(walk_cfg(*common, "batch_size=8"), tmp_path / "b8")
    a, b = sorted((tmp_path / "b1" / "frames").glob("*.png")), sorted((tmp_path / "b8" / "frames").glob("*.png"))
    assert len(a) == len(b) == 10
    assert all(np.array_equal(pixels(p), pixels(q)) for p, q in zip(a, b))


@pytest.mark.parametrize("name", ["random", "circle"])
def test_walker_noise_independent_of_chunking(name):
    w, walk, fr = plan(name, [P1, P2], [1, 2], 6, True)
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def extra(seed, stream, n):
        from stablefused.walkers import derived_seed

        return torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(derived_seed(seed, stream)))

    keys = Keys(noise, torch.zeros(2, 3, 4), [1, 2], extra)
    whole = w.noise(fr, keys)
    w2, _, fr2 = plan(name, [P1, P2], [1, 2], 6, True)
    one = torch.cat([w2.noise([f], keys) for f in reversed(fr2)]).flip(0)
    assert torch.equal(whole, one)
    assert torch.equal(whole[0], noise[0])  # the walk starts at the first keyframe's noise
    ratio = whole.flatten(1).norm(dim=1) / noise[0].norm()
    assert float(ratio.min()) > 0.95 and float(ratio.max()) < 1.05  # norm kept sensible
    if name == "random":
        assert torch.equal(whole[6], noise[1])  # pinned at the second keyframe
        mid = slerp(noise[0], noise[1], 0.5)
        assert float((whole[3] - mid).norm() / mid.norm()) > 0.1  # but wanders in between
        slerp_norms = torch.stack([slerp(noise[f.segment % 2], noise[(f.segment + 1) % 2], f.position) for f in fr])
        assert torch.allclose(whole.flatten(1).norm(dim=1), slerp_norms.flatten(1).norm(dim=1), rtol=1e-5)
    else:  # circle: a closed loop x = cos θ a + sin θ b; the frame after the last would be the first again
        b = extra(1, 1, 1)[0]
        assert torch.allclose(whole[3], noise[0] * np.cos(np.pi / 2) + b * np.sin(np.pi / 2), atol=1e-6)


# ------------------------------------------------------------------------------------------- resume
def test_interrupted_walk_resumes_to_the_same_frames_and_video(tmp_path, monkeypatch):
    from stablefused.tasks import walk as walk_task

    common = [f"prompts=[{P1},{P2},{P3}]", "seeds=[1,2,3]", "segment_frames=4", "loop=true", "batch_size=3"]
    run(walk_cfg(*common), tmp_path / "full")

    real, calls = walk_task.render, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(walk_task, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        run(walk_cfg(*common), tmp_path / "cut")
    assert len(frame_records(tmp_path / "cut")) == 6 and not (tmp_path / "cut" / "walk.mp4").exists()
    made = []

    def counting(run_, walker_, frames, *args, **kwargs):
        made.extend(f.index for f in frames)
        return real(run_, walker_, frames, *args, **kwargs)

    monkeypatch.setattr(walk_task, "render", counting)
    # also lose the last written frame's PNG (its manifest line stays): it is made again
    (tmp_path / "cut" / "frames" / "000005.png").unlink()
    run(walk_cfg(*common[:-1], "batch_size=5"), tmp_path / "cut")  # batch_size may differ on resume
    assert made == list(range(5, 12))  # only the missing frames were made
    recs = frame_records(tmp_path / "cut")
    assert [r["frame"] for r in recs] == list(range(12))
    for p, q in zip(sorted((tmp_path / "full" / "frames").glob("*.png")), sorted((tmp_path / "cut" / "frames").glob("*.png"))):
        assert p.read_bytes() == q.read_bytes()
    assert np.array_equal(video_frames(tmp_path / "full" / "walk.mp4"), video_frames(tmp_path / "cut" / "walk.mp4"))


# ------------------------------------------------------------------------------------------- story
def test_story_walk_captions_srt_and_sample_story(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text(f"# comment\n1 | {P1} | First scene\n\n0.5 | {P2} | Second, longer caption here\n1 | {P3}\n")
    run(walk_cfg("walker=story", f"story={story}", "walk_fps=4", "loop=true", "gif=true", "logger=wandb"), tmp_path / "run")
    recs = frame_records(tmp_path / "run")
    assert len(recs) == 4 + 2 + 4  # seconds x fps per scene, in a loop
    assert [r["caption"] for r in recs[:5]] == ["First scene"] * 4 + ["Second, longer caption here"]
    assert recs[6]["prompt"] == P3 and "caption" in recs[6] and recs[6]["caption"] == ""
    srt = (tmp_path / "run" / "walk.srt").read_text().strip().split("\n\n")
    assert srt[0] == "1\n00:00:00,000 --> 00:00:01,000\nFirst scene"
    assert srt[1] == "2\n00:00:01,000 --> 00:00:01,500\nSecond, longer caption here" and len(srt) == 2
    # captions are burned into the video frames, not into the PNGs
    from stablefused.video import video_frame

    png = tmp_path / "run" / recs[0]["path"]
    plain, captioned = video_frame(png, 16, 256, 256, None, 0.06), video_frame(png, 16, 256, 256, "First scene", 0.06)
    assert (plain != captioned).any(axis=2)[-40:].sum() > 100 and (plain == captioned).all(axis=2)[:150].all()
    vf = video_frames(tmp_path / "run" / "walk.mp4")
    assert vf.shape == (10, 256, 256, 3)
    assert Image.open(tmp_path / "run" / "walk.gif").n_frames == 10
    # W&B: the video and the per-frame table
    from tests.test_app import read_wandb

    (records,) = read_wandb(tmp_path / "run")
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert any("media/videos/walk_" in f and f.endswith(".mp4") for f in files), files
    assert any("media/table/frames" in f for f in files), files
    # the sample story ships and parses
    from stablefused.paths import config_dir

    text = (config_dir() / "walker" / "stories" / "shapes.txt").read_text()
    assert len([x for x in text.splitlines() if x.strip() and not x.startswith("#")]) >= 3


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
def test_story_caption_is_on_screen_exactly_while_its_scene_is(tmp_path, loop):
    """Each frame's caption is the scene whose keyframe dominates the picture (the larger prompt weight), each
    scene is on screen for its seconds (the last one too), and the walk lasts the story's total."""
    story = tmp_path / "story.txt"
    seconds = [1, 0.5, 1.5, 1]
    story.write_text("".join(f"{t} | prompt {i} | caption {i}\n" for i, t in enumerate(seconds)))
    walker = registry.create("walkers", "story")
    walk = Walk(keyframes=[], seeds=[0], frames=3, loop=loop, fps=4.0, story=str(story))
    keyframes = walker.keyframes(walk)
    frames = walker.plan(walk, keyframes)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert len(frames) == sum(seconds) * 4  # the video lasts the story's total
    shown = []
    for f in frames:
        ids, weights = walker.prompt_weights(f, len(keyframes))
        assert max(weights) > 0.5 or len(ids) == 1  # never a tie: one scene is on screen
        main = ids[int(np.argmax(weights))]
        assert f.meta["caption"] == keyframes[main].caption, (f, ids, weights)
        assert f.time == f.index / 4.0
        shown.append(main)
    assert [shown.count(i) for i in range(4)] == [t * 4 for t in seconds]  # each scene lasts its seconds
    assert shown == sorted(shown)  # scene after scene
    for i in range(4):  # every scene's own picture is a frame (its keyframe, weight 1)
        assert any(walker.prompt_weights(f, 4) == ([i], [1.0]) for f in frames), i
    if not loop:  # an open walk starts on the first scene's picture and ends on the last one's
        assert walker.prompt_weights(frames[0], 4) == ([0], [1.0]) and walker.prompt_weights(frames[-1], 4) == ([3], [1.0])


# ------------------------------------------------------------------------------------------- audio
def click_track(path, seconds=3.0, clicks=(0.55, 1.55, 2.55), sr=16000):
    pytest.importorskip("librosa")  # the `audio` extra
    sf = pytest.importorskip("soundfile")

    y = 0.01 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)
    for c in clicks:
        i, n = int(c * sr), int(0.02 * sr)
        y[i : i + n] += 0.9 * np.exp(-np.arange(n) / (0.004 * sr)) * np.sin(2 * np.pi * 1500 * np.arange(n) / sr)
    sf.write(path, y.astype(np.float32), sr)
    return path


def test_audio_walker_moves_on_the_beats(tmp_path):
    wav = click_track(tmp_path / "clicks.wav")
    w = walker("audio", floor=0.0)
    walk = Walk(default_keyframes([P1, P2], [1, 2]), [1, 2], 24, False, 8.0, audio=str(wav))
    fr = w.plan(walk, w.keyframes(walk))
    assert len(fr) == 24  # 3 s at 8 fps: the walk lasts as long as the audio
    pos = np.array([f.position for f in fr])
    assert pos[0] == 0 and pos[-1] == 1 and (np.diff(pos) >= 0).all()
    steps = np.diff(pos)
    big = sorted(np.argsort(steps)[-3:])  # the three biggest moves: the steps holding the clicks
    assert [int(c * 8) for c in (0.55, 1.55, 2.55)] == big
    assert steps[big].sum() > 0.8  # most of the path is travelled on the beats
    w2, walk2 = walker("audio"), Walk(walk.keyframes, [1, 2], 24, False, 8.0, audio=str(wav), audio_start=1.0,
                                      audio_duration=1.5)
    assert len(w2.plan(walk2, walk2.keyframes)) == 12  # the slice's 1.5 s at 8 fps


def test_audio_walk_mp4_carries_the_audio(tmp_path):
    import imageio_ffmpeg

    wav = click_track(tmp_path / "clicks.wav", seconds=2.0, clicks=(0.5, 1.5))
    run(walk_cfg("walker=audio", f"audio={wav}", "walk_fps=6", f"prompts=[{P1},{P2}]", "seeds=[1,2]"), tmp_path / "run")
    assert len(frame_records(tmp_path / "run")) == 12
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(tmp_path / "run" / "walk.mp4")],
                           capture_output=True, text=True).stderr
    assert "Audio: aac" in probe and "Video: h264" in probe and "yuv420p" in probe
    n, secs = imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "run" / "walk.mp4"))
    assert n == 12 and abs(secs - 2.0) < 0.1


def test_audio_without_librosa_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "librosa", None)
    from stablefused.paths import config_dir

    wav = config_dir() / "walker" / "sounds" / "clicks.wav"
    with pytest.raises(ConfigError) as e:
        run(walk_cfg("walker=audio", f"audio={wav}", f"prompts=[{P1},{P2}]", "seeds=[1,2]"), tmp_path / "run")
    assert str(e.value) == "walker=audio needs librosa and soundfile: pip install 'stablefused[audio]'"


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["segment_frames=0"], "segment_frames=0: must be an integer >= 1"),
    (["pacing=fast"], "pacing='fast': must be uniform or even"),
    (["walk_fps=0"], "walk_fps=0: must be a number > 0"),
    (["guidance_scales=[1,7]"], "a walk uses one guidance scale"),
    ([f"prompts=[{P1},{P2},{P3}]", "seeds=[1,2]"], "seeds: 2 seeds for 3 prompts"),
    ([f"prompts=[{P1}]", "seeds=[1]"], "1 keyframe(s); walker=interpolate needs at least 2"),
    (["walker.name=nope"], "no walkers plugin named 'nope'"),
    (["walker.text=cubic"], "walker.text='cubic': must be one of lerp, slerp"),
    (["+walker.speed=2"], "has no parameter 'speed'"),
    (["story=x.txt"], "story=x.txt: only walker=story reads it; add walker=story"),
    (["walker=story", "story=missing.txt"], "story=missing.txt: no such file"),
    (["walker=audio", "pacing=even", "audio=conf/walker/sounds/clicks.wav"], "pacing=even: walker=audio sets its own pacing"),
])
def test_bad_settings_are_one_line_each(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        run(walk_cfg(f"prompts=[{P1},{P2}]", "seeds=[1,2]", *overrides), tmp_path)
    assert message in str(e.value)
    assert not (tmp_path / "frames").exists()


def test_one_seed_for_all_or_one_prompt_for_all():
    assert [(k.prompt, k.seed) for k in default_keyframes([P1, P2, P3], [5])] == [(P1, 5), (P2, 5), (P3, 5)]
    assert [(k.prompt, k.seed) for k in default_keyframes([P1], [1, 2])] == [(P1, 1), (P1, 2)]


# ------------------------------------------------------------------------------------------- pacing
def test_even_pacing_makes_consecutive_frames_more_equally_different(tmp_path):
    from stablefused.pacing import frame_distances

    common = [f"prompts=[{P1},{P2}]", "seeds=[1,2]", "segment_frames=8", "steps=4"]
    cv = {}
    for pacing in ("uniform", "even"):
        run(walk_cfg(*common, f"pacing={pacing}"), tmp_path / pacing)
        recs = frame_records(tmp_path / pacing)
        imgs = np.stack([pixels(tmp_path / pacing / r["path"]) / 255.0 for r in recs])
        d = frame_distances(imgs)
        cv[pacing] = d.std() / d.mean()
    assert cv["even"] < 0.6 * cv["uniform"], cv
    saved = json.loads((tmp_path / "even" / "pacing.json").read_text())
    pos = [r["position"] for r in frame_records(tmp_path / "even")]
    assert saved["positions"] == pos and pos[0] == 0 and pos[-1] == 1 and pos == sorted(set(pos))
    assert pos != [k / 8 for k in range(9)]


# ------------------------------------------------------------------------------------------- hook for zoom
@registry.register("walkers", "test_previous")
class PreviousImage(Walker):
    """Test walker: records the previous image it is given (as a zoom walker would use it)."""

    needs_previous_image = True
    seen: list = []

    def __init__(self, text: str = "lerp", easing: str = "linear"):
        super().__init__(text=text, easing=easing)

    def condition(self, frames, previous, keys, run):
        PreviousImage.seen.append(None if previous is None else np.asarray(previous))
        assert len(frames) == 1
        return {}


def test_walker_gets_the_previous_frame_image(tmp_path):
    PreviousImage.seen.clear()
    run(walk_cfg(f"prompts=[{P1},{P2}]", "seeds=[1,2]", "walker.name=test_previous"), tmp_path)
    recs = frame_records(tmp_path)
    assert len(PreviousImage.seen) == len(recs) == 4 and PreviousImage.seen[0] is None
    for i in range(1, 4):
        assert np.array_equal(PreviousImage.seen[i], pixels(tmp_path / recs[i - 1]["path"]))


def test_guidance_recorders_and_metrics_work_in_a_walk(tmp_path):
    r = run(walk_cfg(f"prompts=[{P1},{P2},{P3}]", "seeds=[1,2,3]", "guidance=cutoff", "recorders=[stats]",
                     "metrics=[shapes_adherence]"), tmp_path)
    recs = frame_records(tmp_path)
    assert len(recs) == 7 and all("shapes_adherence/mean" in x and x["guidance_schedule"] == "cutoff" for x in recs)
    # cutoff drops the unconditional half for the later steps: fewer UNet rows than full CFG (7 frames x 3 steps x 2)
    assert r.stats["unet_rows"] < 7 * 3 * 2
    assert (tmp_path / "records.safetensors").is_file()
    assert set(json.loads((tmp_path / "metrics_by_segment.json").read_text())) == {"0", "1"}


def test_experiments_compose():
    for name in ("latent_walk", "story_walk", "audio_walk"):
        cfg = compose_cfg(f"experiment={name}", "model=shapes")
        from stablefused.config import validate

        validate(cfg)
        assert cfg.task == "walk"
