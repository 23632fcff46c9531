"""The core loop: parity with diffusers, guidance for every real value, seeds, x̂0, hooks, schedulers."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)

from stablefused.guidance import Guidance, GuidanceRule, per_sample
from stablefused.hooks import BaseHook
from stablefused.models import build_tiny_random
from stablefused.pipeline import Sampler
from stablefused.sampling import predict_x0

PROMPTS = ["a red circle", "a small blue square on black"]
NEG = ["green", "white background"]


def reference(comps, scheduler, prompts, seeds, scale, steps=6, height=16, width=24, neg=NEG):
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, negative_prompt=neg, height=height, width=width, num_inference_steps=steps,
                guidance_scale=scale, generator=gens, output_type="np").images


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler])
def test_parity_with_diffusers_pipeline(tiny, cls):
    ref = reference(tiny, cls.from_config(tiny.scheduler_config), PROMPTS, [3, 7], 7.5)
    ours = Sampler(tiny, cls.from_config(tiny.scheduler_config)).txt2img(
        PROMPTS, [3, 7], 7.5, NEG, steps=6, height=16, width=24, progress=False).images
    assert ours.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(ours - ref).max() <= 1e-5


def test_parity_v_prediction():
    comps = build_tiny_random(seed=1, prediction_type="v_prediction")
    assert comps.scheduler_config["prediction_type"] == "v_prediction"
    cls = EulerAncestralDiscreteScheduler
    ref = reference(comps, cls.from_config(comps.scheduler_config), PROMPTS, [1, 2], 4.0)
    ours = Sampler(comps, cls.from_config(comps.scheduler_config)).txt2img(
        PROMPTS, [1, 2], 4.0, NEG, steps=6, height=16, width=24, progress=False).images
    assert np.abs(ours - ref).max() <= 1e-5


class FullCFG(GuidanceRule):
    """CFG that always evaluates both halves (no skipping): the reference for the skipping loop."""

    def __call__(self, cond, uncond, w, info):
        return uncond + per_sample(w, cond) * (cond - uncond)


class CountRows(BaseHook):
    def __init__(self):
        self.rows = []

    def on_step(self, state):
        self.rows.append(state.unet_rows)


def test_every_real_guidance_value_and_half_batch_skipping(tiny):
    scales = [-3.0, 0.0, 0.5, 1.0, 7.5]
    prompts, seeds = [PROMPTS[0]] * 5, [11] * 5
    s = Sampler(tiny)
    counter = CountRows()
    skipped = s.txt2img(prompts, seeds, scales, steps=4, hooks=[counter], progress=False)
    full = s.txt2img(prompts, seeds, scales, steps=4, guidance=Guidance(Guidance.default().schedule, FullCFG()),
                     progress=False)
    # 0 needs only the unconditional pass, 1 only the conditional one: 2 + 1 + 2 + 1 + 2 rows, not 10.
    assert counter.rows == [8] * 4
    assert skipped.context.stats["unet_rows"] == 32 and full.context.stats["unet_rows"] == 40
    assert np.abs(skipped.images - full.images).max() <= 1e-5
    # Every scale is honoured: no two columns give the same image (diffusers would make all w <= 1 equal).
    imgs = skipped.images
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(imgs[i] - imgs[j]).max() > 1e-3, (scales[i], scales[j])


def test_scale_zero_is_unconditional_and_one_is_conditional(tiny):
    s = Sampler(tiny)
    # w = 0 equals sampling with the negative prompt as the only condition (w = 1 with cond := uncond).
    zero = s.txt2img([PROMPTS[0]], [4], [0.0], [NEG[0]], steps=4, progress=False).images
    neg_only = s.txt2img([NEG[0]], [4], [1.0], [PROMPTS[0]], steps=4, progress=False).images
    assert np.abs(zero - neg_only).max() <= 1e-5


def test_image_depends_on_its_seed_only(tiny):
    s = Sampler(tiny)
    alone = s.txt2img([PROMPTS[0]], [5], 7.5, steps=4, progress=False).images[0]
    batch = s.txt2img([PROMPTS[0]] * 3, [3, 5, 9], 7.5, steps=4, progress=False).images
    assert np.abs(alone - batch[1]).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    # stochastic scheduler: the per-step noise is per image too
    anc = Sampler(tiny, EulerAncestralDiscreteScheduler.from_config(tiny.scheduler_config))
    alone = anc.txt2img([PROMPTS[0]], [5], 7.5, steps=4, progress=False).images[0]
    batch = anc.txt2img([PROMPTS[1], PROMPTS[0], PROMPTS[1]], [3, 5, 9], 7.5, steps=4, progress=False).images
    assert np.abs(alone - batch[1]).max() <= 1e-5


class Capture(BaseHook):
    def __init__(self):
        self.states = []

    def on_step(self, state):
        self.states.append(state)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_derived_x0_matches_scheduler_x0(prediction_type):
    comps = build_tiny_random(prediction_type=prediction_type)
    cap = Capture()
    s = Sampler(comps, DDIMScheduler.from_config(comps.scheduler_config))
    s.txt2img(PROMPTS, [1, 2], 5.0, steps=5, hooks=[cap], progress=False)
    for st in cap.states:
        model_input = st.x_t  # DDIM does not scale its input
        derived = predict_x0(st.eps_guided, model_input, st.sigma, prediction_type)
        assert torch.allclose(derived, st.x0_pred, atol=1e-4), st.index


def test_derived_x0_for_sigma_scheduler_without_pred_original_sample(tiny):
    """DPM++ 2M gives no x̂0; the derived one must match DDIM-style x̂0 from the same prediction."""
    cap = Capture()
    sched = DPMSolverMultistepScheduler.from_config(tiny.scheduler_config)
    Sampler(tiny, sched).txt2img(PROMPTS, [1, 2], 5.0, steps=5, hooks=[cap], progress=False)
    ac = sched.alphas_cumprod
    for st in cap.states:
        a = ac[int(st.t)]
        expected = (st.x_t - (1 - a).sqrt() * st.eps_guided) / a.sqrt()
        assert torch.allclose(st.x0_pred, expected, atol=1e-3)


def test_hook_interface_order_and_latent_replacement(tiny):
    calls = []

    class Recorder(BaseHook):
        def before_loop(self, ctx):
            calls.append(("before", ctx.latents.shape[0], [x["seed"] for x in ctx.samples]))

        def on_step(self, state):
            calls.append(("step", state.index, tuple(state.guidance_scale.tolist())))
            for name in ("x_t", "eps_cond", "eps_uncond", "eps_guided", "x0_pred", "x_prev"):
                assert getattr(state, name).shape == (2, 4, 8, 8)

        def after_loop(self, ctx, latents):
            calls.append(("after",))

    class Zero(BaseHook):
        """Replace x_{t-1} with zeros at the last step: the final latents must be exactly zero."""

        def on_step(self, state):
            if state.index == state.num_steps - 1:
                return torch.zeros_like(state.x_prev)

    s = Sampler(tiny)
    out = s.txt2img(PROMPTS, [1, 2], [2.0, -1.0], steps=3, hooks=[Recorder(), Zero()],
                    samples=[{"seed": 1}, {"seed": 2}], progress=False)
    assert calls[0] == ("before", 2, [1, 2]) and calls[-1] == ("after",)
    assert [c[1] for c in calls[1:-1]] == [0, 1, 2]
    assert calls[1][2] == (2.0, -1.0)
    assert torch.count_nonzero(out.latents) == 0


def test_repeated_prompts_are_encoded_once():
    """A sweep repeats each prompt per seed and scale: the text encoder sees each distinct prompt once, and the
    rows equal the family's own per-row encoding."""
    s = Sampler(build_tiny_random())
    seen = []
    handle = s.c.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle", "a blue square"]
    try:
        cond = s.encode(prompts)
    finally:
        handle.remove()
    assert seen == [2]
    ref = s.family.encode(prompts)
    assert cond.embeds.shape == ref.embeds.shape
    torch.testing.assert_close(cond.embeds, ref.embeds, rtol=0, atol=1e-5)
