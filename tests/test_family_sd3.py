"""SD3/3.5 through the one loop: parity with ``StableDiffusion3Pipeline``, ``StableDiffusion3Img2ImgPipeline``
and ``StableDiffusion3InpaintPipeline`` (fp32, CPU) on tiny random components saved with ``save_pretrained``
and loaded back through our loader, with SD3's scheduler config from disk (FlowMatchEuler, shift 3.0) and a
second scheduler (FlowMatchHeun, same config); guidance 0, 1 and negative against a plain loop written here;
broken conditioning (pooled embeddings swapped, shift dropped, CLIP's last instead of penultimate layer, T5
dropped) fails parity; flow σ, x̂0 and interval guidance; every guidance schedule/rule; the CLI on
``model=tiny_sd3`` (txt2img, img2img, inpaint, walk with recorders and visualizers); previews; offline hub
configs fail fast."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline,
)
from PIL import Image

from stablefused import registry
from stablefused.app import run
from stablefused.config import validate
from stablefused.errors import ConfigError, ModelLoadError
from stablefused.families import family_of_model_cfg
from stablefused.families import sd3 as sd3_module
from stablefused.families.sd3 import SD3, build_tiny
from stablefused.guidance import Guidance
from stablefused.hooks import BaseHook
from stablefused.models import build_tiny_random, load_components, save_components
from stablefused.pipeline import Sampler
from stablefused.tasks.img2img import img2img
from stablefused.tasks.inpaint import inpaint
from tests.conftest import compose_cfg

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", ""]
SEEDS = [3, 7]
STEPS = 4
MSL = 24  # T5 tokens (max_sequence_length), as model.max_sequence_length passes it
TOL = 1e-5
SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def _load(folder, name="sd3_tiny"):
    return load_components({"name": name, "path": str(folder), "max_sequence_length": MSL}, "cpu", "float32")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD3.5-shaped components saved as diffusers folders with SD3's scheduler config (shift 3.0) and
    loaded back through our loader: with T5, without T5 (text_encoder_3: null), and a 33-channel inpainting
    transformer."""
    root = tmp_path_factory.mktemp("sd3")
    comps = build_tiny(seed=1)
    out = {}
    for key, c in (("t5", comps), ("no_t5", replace(comps, modules={**comps.modules, "tokenizer_3": None,
                                                                      "text_encoder_3": None})),
                   ("inpaint33", build_tiny(seed=2, in_channels=33))):
        folder = save_components(c, root / key)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
        out[key] = _load(folder)
        out[key + "_folder"] = folder
    index = json.loads((out["no_t5_folder"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert out["no_t5"].modules["text_encoder_3"] is None and out["t5"].modules["text_encoder_3"] is not None
    return out


def pipeline(comps, cls=StableDiffusion3Pipeline, scheduler=None):
    m = comps.modules
    pipe = cls(transformer=m["transformer"], scheduler=scheduler or comps.make_scheduler(), vae=m["vae"],
               text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], text_encoder_2=m["text_encoder_2"],
               tokenizer_2=m["tokenizer_2"], text_encoder_3=m["text_encoder_3"], tokenizer_3=m["tokenizer_3"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Calls:
    def __init__(self, net):
        self.n, self.rows = 0, 0
        self.handle = net.register_forward_hook(self)

    def __call__(self, module, args, kwargs_or_out, *rest):
        self.n += 1

    def remove(self):
        self.handle.remove()


def reference(pipe, **kw):
    """The pipeline's images, final latents (captured at its last step) and transformer calls."""
    final = {}

    def grab(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    calls = Calls(pipe.transformer)
    try:
        images = pipe(prompt=kw.pop("prompts", PROMPTS), negative_prompt=kw.pop("negative", NEG),
                      generator=[torch.Generator().manual_seed(s) for s in SEEDS], num_inference_steps=STEPS,
                      height=16, width=16, max_sequence_length=MSL, output_type="np", callback_on_step_end=grab,
                      **kw).images
    finally:
        calls.remove()
    return images, final["latents"], calls.n


def ours_txt2img(comps, scale, scheduler=None, **kw):
    sampler = Sampler(comps, scheduler or comps.make_scheduler())
    calls = Calls(comps.network)
    try:
        gen = sampler.txt2img(PROMPTS, SEEDS, scale, NEG, steps=STEPS, progress=False, **kw)
    finally:
        calls.remove()
    return gen, calls.n


def diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("t5", ["t5", "no_t5"])
@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_txt2img_matches_sd3_pipeline(models, sched, t5, scale):
    comps = models[t5]
    cls = SCHEDULERS[sched]
    ref_img, ref_lat, ref_calls = reference(pipeline(comps, scheduler=cls.from_config(comps.scheduler_config)),
                                            guidance_scale=scale)
    gen, calls = ours_txt2img(comps, scale, comps.make_scheduler(cls.__name__))
    assert float(ref_img.std()) > 0.01  # the decoded images are not a constant colour
    assert diff(gen.latents, ref_lat) <= TOL and diff(gen.images, ref_img) <= TOL
    assert calls == ref_calls == STEPS * (2 if sched == "heun" else 1) - (1 if sched == "heun" else 0)


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("strength,scale", [(0.6, 7.5), (1.0, 3.0)])
def test_img2img_matches_sd3_img2img_pipeline(models, sched, strength, scale):
    comps = models["t5"]
    cls = SCHEDULERS[sched]
    sources = _sources()
    ref_img, ref_lat, ref_calls = reference(
        pipeline(comps, StableDiffusion3Img2ImgPipeline, cls.from_config(comps.scheduler_config)),
        image=sources, strength=strength, guidance_scale=scale)
    sampler = Sampler(comps, comps.make_scheduler(cls.__name__))
    calls = Calls(comps.network)
    try:
        gen = img2img(sampler, sources, PROMPTS, SEEDS, [scale] * 2, strength, NEG, steps=STEPS, progress=False)
    finally:
        calls.remove()
    assert diff(gen.latents, ref_lat) <= TOL and diff(gen.images, ref_img) <= TOL
    assert calls.n == ref_calls


@pytest.mark.parametrize("kind", ["t5", "inpaint33"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpaint_matches_sd3_inpaint_pipeline(models, kind, strength):
    """16 channels (the known region blended back each step) and 33 channels (mask + masked-image latents
    as extra input channels). Compared on the final latents: the diffusers pipeline decodes without the VAE's
    shift_factor (its img2img and text-to-image pipelines add it), so its pixels are not SD3's."""
    comps = models[kind]
    sources = _sources()
    masks = [Image.fromarray(np.pad(np.full((8, 10), 255, np.uint8), ((4, 4), (2, 4)))), Image.new("L", (16, 16), 0)]
    masks[1].paste(255, (0, 0, 8, 16))
    _, ref_lat, ref_calls = reference(pipeline(comps, StableDiffusion3InpaintPipeline), image=sources,
                                      mask_image=masks, strength=strength, guidance_scale=7.5)
    calls = Calls(comps.network)
    try:
        gen = inpaint(Sampler(comps), sources, masks, PROMPTS, SEEDS, [7.5, 7.5], strength, NEG, steps=STEPS,
                      progress=False)
    finally:
        calls.remove()
    assert diff(gen.latents, ref_lat) <= TOL and calls.n == ref_calls


def _sources():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]


# ------------------------------------------------------------------------------------ plain loop at 0, 1, <0
def test_guidance_0_1_negative_match_a_plain_loop(models):
    """Scales the pipeline cannot express (it turns guidance off at <= 1): a plain CFG loop on the
    pipeline's own prompt embeddings, every row through both passes; ours skips the pass a row does not need."""
    comps = models["t5"]
    prompts, neg, seeds, scales = PROMPTS + ["a cat"], NEG + ["dog"], SEEDS + [11], [0.0, 1.0, -2.0]
    pipe = pipeline(comps)
    pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, negative_prompt=neg, max_sequence_length=MSL)
    sched = FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)
    sched.set_timesteps(STEPS)
    x = torch.cat([torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    w = torch.tensor(scales).view(-1, 1, 1, 1)
    net = comps.network
    for t in sched.timesteps:
        out = net(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(x)),
                  encoder_hidden_states=torch.cat([npe, pe]), pooled_projections=torch.cat([npp, pp]),
                  return_dict=False)[0]
        u, c = out.chunk(2)
        x = sched.step(u + w * (c - u), t, x, return_dict=False)[0]
    gen = Sampler(comps).txt2img(prompts, seeds, scales, neg, steps=STEPS, progress=False)
    assert diff(gen.latents, x) <= TOL
    assert gen.context.stats["unet_rows"] == STEPS * 4  # 1 + 1 + 2 rows instead of 6


# ------------------------------------------------------------------------------- broken conditioning fails
def _swap_pooled(monkeypatch):
    encode = SD3.encode

    def swapped(self, prompts, negative=False):
        cond = encode(self, prompts, negative)
        p = cond.rows["pooled_projections"]
        width_l = self.c.text_encoder.config.projection_dim
        cond.rows["pooled_projections"] = torch.cat([p[:, width_l:], p[:, :width_l]], dim=-1)  # CLIP-G first
        return cond

    monkeypatch.setattr(SD3, "encode", swapped)


def _last_layer(monkeypatch):
    def last(tokenizer, text_encoder, prompts, window, device):
        ids = tokenizer(list(prompts), padding="max_length", max_length=window, truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[-1], out[0]

    monkeypatch.setattr(sd3_module, "clip_embeds", last)


@pytest.mark.parametrize("broken", ["swap_pooled", "no_shift", "clip_last_layer", "drop_t5", "none"])
def test_breaking_the_conditioning_fails_parity(models, monkeypatch, broken):
    comps = models["t5"]
    _, ref_lat, _ = reference(pipeline(comps), guidance_scale=7.5)
    scheduler = None
    if broken == "swap_pooled":
        _swap_pooled(monkeypatch)
    elif broken == "no_shift":
        scheduler = comps.make_scheduler(shift=1.0)
    elif broken == "clip_last_layer":
        _last_layer(monkeypatch)
    elif broken == "drop_t5":
        comps = replace(comps, modules={**comps.modules, "text_encoder_3": None})
    gen, _ = ours_txt2img(comps, 7.5, scheduler)
    if broken == "none":  # the control: the same harness, nothing broken
        assert diff(gen.latents, ref_lat) <= TOL
    else:
        assert diff(gen.latents, ref_lat) > 1e-3


# --------------------------------------------------------------------------------- flow σ, x̂0, guidance
class Keep(BaseHook):
    def __init__(self):
        self.states = []

    def on_step(self, state):
        self.states.append(state)


def test_flow_sigma_x0_and_interval_guidance(models):
    """σ = s/(1−s) (EDM convention; inf at s = 1), x̂0 = x − s·v for the flow prediction, and interval
    guidance (σ in (0.28, 5.42]) turns guidance off (conditional pass only) at the steps outside."""
    comps = models["t5"]
    sampler = Sampler(comps)
    sampler.prepare(STEPS, SEEDS)
    s = [float(v) for v in sampler.scheduler.sigmas[:STEPS]]
    sig = sampler.family.sigmas(sampler.scheduler)
    assert s[0] == 1.0 and sig[0] == float("inf")
    assert sig[1:] == pytest.approx([v / (1 - v) for v in s[1:]])
    assert sampler.family.prediction_type == "flow"
    keep = Keep()
    gen = sampler.txt2img(PROMPTS, SEEDS, 5.0, NEG, steps=STEPS, progress=False, hooks=[keep],
                          guidance=Guidance.from_config({"schedule": "interval", "rule": "cfg"}))
    for st, sv in zip(keep.states, s):
        torch.testing.assert_close(st.x0_pred, st.x_t - sv * st.eps_guided, rtol=0, atol=1e-6)
    assert torch.allclose(keep.states[-1].x_prev, gen.latents)
    inside = [0.28 < v <= 5.42 for v in sig]
    assert inside[0] is False and any(inside)  # first step: σ = inf, outside
    for st, ins in zip(keep.states, inside):
        assert st.unet_rows == (4 if ins else 2)
        assert st.guidance_scale.tolist() == ([5.0, 5.0] if ins else [1.0, 1.0])


@pytest.mark.parametrize("kind", ["guidance_schedule", "guidance_rule"])
def test_every_guidance_schedule_and_rule_runs(models, kind):
    registry.discover()
    comps = models["no_t5"]
    for name in registry.list_names(kind):
        cfg = {"schedule": name} if kind == "guidance_schedule" else {"rule": name}
        try:
            guidance = Guidance.from_config(cfg)
        except registry.ParamError:  # a guider that needs settings (autoguidance's weak model, a config file)
            continue
        if "sd3" not in (getattr(guidance.rule, "families", None) or ["sd3"]):  # SAG: UNets only, in one line
            with pytest.raises(ValueError, match=f"^guidance.rule={name}: defined for model families .* not sd3$"):
                Sampler(comps).txt2img(PROMPTS, SEEDS, 4.0, NEG, steps=2, progress=False, guidance=guidance)
            continue
        gen = Sampler(comps).txt2img(PROMPTS, SEEDS, [0.0, 4.0], NEG, steps=2, progress=False, guidance=guidance)
        assert np.isfinite(gen.images).all() and torch.isfinite(gen.latents).all(), name


# ----------------------------------------------------------------------------------------------- the CLI
SMALL = ["model=tiny_sd3", "steps=3", "seeds=[0,1]", "prompts=[a red circle]"]


def _decodes(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_cli_txt2img_img2img_walk_with_recorders(tmp_path):
    r = run(compose_cfg(*SMALL, "guidance_scales=[0,1,5]", "recorders=[x0,stats,latents]",
                        "visualizers=[step_strip,stats_plot,denoise_video]", "visualizers.stats_plot.x=sigma"),
            tmp_path / "t2i")
    d = tmp_path / "t2i"
    assert len(list((d / "images").glob("*.png"))) == 6
    for png in ["grid.png", "step_strip_x0.png", "stats_plot.png", *(d / "images").glob("*.png")]:
        assert _decodes(d / png)[0] > 0
    assert (d / "denoise.mp4").stat().st_size > 0
    from safetensors.torch import load_file

    rec = load_file(d / "records.safetensors")
    x0 = next(v for k, v in rec.items() if k.startswith("x0"))
    assert x0.shape[-3:] == (16, 8, 8) and torch.isfinite(x0).all()

    run(compose_cfg(*SMALL, "task=img2img", "init_image=shapes:a red circle", "strengths=[0.5]",
                    "guidance_scales=[3]", "recorders=[x0]", "visualizers=[step_strip]", "scheduler=flow_heun"),
        tmp_path / "i2i")
    assert _decodes(tmp_path / "i2i" / "grid.png") and _decodes(tmp_path / "i2i" / "step_strip_x0.png")

    run(compose_cfg("model=tiny_sd3", "steps=3", "task=walk", "prompts=[a red circle,a blue square]",
                    "seeds=[1,2]", "segment_frames=3", "recorders=[x0]"), tmp_path / "walk")
    frames = sorted((tmp_path / "walk" / "frames").glob("*.png"))
    assert len(frames) == 4 and all(_decodes(f) == (16, 16) for f in frames)
    assert (tmp_path / "walk" / "walk.mp4").stat().st_size > 0
    a, b = (np.asarray(Image.open(f), dtype=float) for f in frames[:2])
    assert np.abs(a - b).mean() > 0  # the walk moves


def test_cli_inpaint(tmp_path):
    run(compose_cfg(*SMALL, "task=inpaint", "init_image=shapes:a red circle", "mask=[circle:16,16,8]",
                    "strengths=[1.0]", "guidance_scales=[3]"), tmp_path / "inp")
    assert len(list((tmp_path / "inp" / "images").glob("*.png"))) == 2


def test_what_sd3_cannot_do_is_one_line_before_the_model_loads(models):
    for overrides, text in ((["scheduler=euler"], "scheduler=euler: EulerDiscreteScheduler is not a flow-matching "
                                                  "scheduler"),
                            (["task=txt2video"], "task=txt2video: needs a text-to-video model"),
                            (["model.max_sequence_length=600"], r"model.max_sequence_length=600: T5 tokens, an "
                                                                r"integer in 1..512")):
        with pytest.raises(ConfigError, match=text):
            validate(compose_cfg(*SMALL, *overrides))
    # a model folder is recognised from its model_index.json, without loading it
    cfg = compose_cfg("model=tiny_random", f"model.path={models['t5_folder']}", "model.builtin=null",
                      "scheduler=ddim")
    assert family_of_model_cfg(cfg.model) == "sd3"
    with pytest.raises(ConfigError, match="DDIMScheduler is not a flow-matching scheduler"):
        validate(cfg)
    # and the other way round: a flow-matching scheduler on an SD model folder
    sd_folder = save_components(build_tiny_random(), models["t5_folder"].parent / "sd")
    with pytest.raises(ConfigError, match="FlowMatchHeunDiscreteScheduler is a flow-matching scheduler"):
        validate(compose_cfg("model=tiny_random", f"model.path={sd_folder}", "model.builtin=null", "scheduler=flow_heun"))


def test_attention_maps_from_joint_attention(models, tmp_path):
    """The attention recorder on SD3's joint attention: the image queries' softmax over the text keys (the
    projections the transformer itself computed, captured here), conditional rows, on the latent grid; the
    images do not change by a bit; the CLI draws the maps."""
    registry.discover()
    comps = models["t5"]
    attn = comps.network.transformer_blocks[0].attn
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, out)  # the first call: step 0
        return hook

    handles = [attn.to_q.register_forward_hook(keep("q")), attn.add_k_proj.register_forward_hook(keep("k"))]
    rec = registry.create("recorders", "attention", layers=["transformer_blocks.0.attn"], steps=[0])
    try:
        gen = Sampler(comps).txt2img(PROMPTS, SEEDS, 5.0, NEG, steps=STEPS, progress=False, hooks=[rec])
    finally:
        for h in handles:
            h.remove()
    plain = Sampler(comps).txt2img(PROMPTS, SEEDS, 5.0, NEG, steps=STEPS, progress=False)
    assert np.array_equal(gen.images, plain.images)
    maps = rec.result()[0]["attention"][0]
    assert rec.used_layers == ["transformer_blocks.0.attn"] and maps.shape == (2, 16 + MSL, 8, 8)
    b, h = 2 * len(PROMPTS), attn.heads
    q = attn.norm_q(seen["q"].view(b, -1, h, 8).transpose(1, 2))
    k = attn.norm_added_k(seen["k"].view(b, -1, h, 8).transpose(1, 2))
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1).mean(1)[len(PROMPTS):]  # cond rows
    want = torch.nn.functional.interpolate(probs.transpose(1, 2).reshape(2, -1, 4, 4), size=(8, 8), mode="bilinear")
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8), rtol=0, atol=1e-4)

    run(compose_cfg(*SMALL, "guidance_scales=[5]", "recorders=[attention]", "visualizers=[attention_maps]"),
        tmp_path / "cli")
    assert _decodes(tmp_path / "cli" / "attention_maps.png")


# ------------------------------------------------------------------------------------------------ preview
def test_linear_preview_16_channels(models):
    from types import SimpleNamespace

    from stablefused.families.sd3 import SD3, SD3_LATENT_RGB
    from stablefused.preview import known_preview, make_decoder

    comps = models["t5"]
    sampler = Sampler(comps)
    assert known_preview(sampler) is None  # the tiny VAE: fitted
    decode = make_decoder(sampler, "linear")
    assert decode.weight.shape == (16, 3)
    lat = sampler.family.noise([torch.Generator().manual_seed(0)], 16, 16)
    img = decode(lat)
    assert img.shape == (1, 8, 8, 3) and 0 <= img.min() and img.max() <= 1
    # the fit explains the tiny VAE's pooled decode better than a constant image does
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(sampler.decode(lat)).permute(0, 3, 1, 2), 2)
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert np.abs(img - ref).mean() < np.abs(ref.mean() - ref).mean()

    class Cfg(dict):
        __getattr__ = dict.get

    class Vae:
        config = Cfg(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, block_out_channels=[128, 256, 512, 512])

    fake = SimpleNamespace(vae=Vae())
    known = known_preview(SimpleNamespace(c=fake, family=SD3(fake)))
    assert known is not None and known.weight.shape == (16, 3)
    assert torch.allclose(known.weight, torch.tensor(SD3_LATENT_RGB) / 2)


# ----------------------------------------------------------------------------------------- hub configs
@pytest.mark.parametrize("model", ["sd35_medium", "sd3_medium"])
def test_hub_configs_fail_fast_offline(model):
    cfg = compose_cfg(f"model={model}")
    assert cfg.model.family == "sd3" and cfg.model.gpu_dtype == "bfloat16"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{cfg.model.hub_id} is not downloaded and the hub is offline"):
        validate(cfg)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_components(cfg.model, "cpu", "auto")
    assert time.perf_counter() - t0 < 10


def test_dtype_auto_is_float32_on_the_cpu():
    comps = load_components(compose_cfg("model=tiny_sd3", "model.gpu_dtype=bfloat16").model, "cpu", "auto")
    assert comps.dtype == torch.float32 and comps.info["max_sequence_length"] == 24
