"""The loop's seams for the other tasks, each checked against a reference computed another way:
``start_step`` (image-to-image), ``extra_channels`` (inpainting UNets), 5-D latents (video) and a latent
replacement returned from ``before_loop``."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from stablefused.hooks import BaseHook
from stablefused.pipeline import Sampler
from conftest import run_loop

PROMPTS = ["a red circle", "a small blue square on black"]


def _setup(tiny, cls=DDIMScheduler, steps=5):
    s = Sampler(tiny, cls.from_config({**tiny.scheduler_config, "timestep_spacing": "leading"}))
    lat, gens = s.initial_latents([3, 4], 16, 16, steps=steps)
    return s, lat, s.encode(PROMPTS), s.encode(["", ""])


class Keep(BaseHook):
    def __init__(self):
        self.x_t = []

    def on_step(self, state):
        self.x_t.append(state.x_t.clone())


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_start_step_continues_the_schedule(tiny, cls):
    """Starting at step k from the latents a full run had entering step k gives the full run's result."""
    s, lat, cond, uncond = _setup(tiny, cls)
    keep = Keep()
    full, _ = run_loop(s, lat, cond, uncond, [7.5, 2.0], 5, hooks=[keep])
    tail, ctx = run_loop(s, keep.x_t[2], cond, uncond, [7.5, 2.0], 5, start_step=2)
    assert ctx.stats["model_calls"] == 3
    assert torch.allclose(full, tail, atol=1e-6)


class Mixer(torch.nn.Module):
    """A 6-channel UNet made from the 4-channel one: the two extra channels are added to channels 0 and 1."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        assert x.shape[1] == 6
        return self.unet(x[:, :4] + torch.nn.functional.pad(x[:, 4:], (0, 0, 0, 0, 0, 2)), t,
                         encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)


def test_extra_channels_follow_their_rows(tiny):
    """Each row's extra channels reach that row's UNet input, also when guidance 0/1 skips half-batches."""
    s, lat, cond, uncond = _setup(tiny)
    extra = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    scales = [0.0, 7.5]  # row 0 needs only the unconditional pass: the index-select path
    both, _ = run_loop(s, lat, cond, uncond, scales, 3, network=Mixer(tiny.unet), extra_channels=extra)
    for i in range(2):
        alone, _ = run_loop(s, lat[i : i + 1], cond.select([i]), uncond.select([i]), scales[i : i + 1], 3,
                            network=Mixer(tiny.unet), extra_channels=extra[i : i + 1])
        assert torch.allclose(both[i : i + 1], alone, atol=1e-5)
    zero, _ = run_loop(s, lat, cond, uncond, scales, 3, network=Mixer(tiny.unet), extra_channels=torch.zeros_like(extra))
    plain, _ = run_loop(s, lat, cond, uncond, scales, 3)
    assert torch.allclose(zero, plain, atol=1e-6) and not torch.allclose(both, plain, atol=1e-3)


class FramesAsBatch(torch.nn.Module):
    """A video UNet made from the image one: each frame of (B, C, F, H, W) denoised as its own image."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = self.unet(flat, t, encoder_hidden_states=encoder_hidden_states.repeat_interleave(f, 0))[0]
        return (out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4),)


def test_five_dimensional_latents(tiny):
    s, lat, cond, uncond = _setup(tiny)
    video = torch.stack([lat, lat.flip(-1), -lat], dim=2)  # (2, 4, 3 frames, 8, 8)
    out, _ = run_loop(s, video, cond, uncond, [0.0, 7.5], 3, network=FramesAsBatch(tiny.unet))
    assert out.shape == video.shape
    for f in range(3):
        ref, _ = run_loop(s, video[:, :, f], cond, uncond, [0.0, 7.5], 3)
        assert torch.allclose(out[:, :, f], ref, atol=1e-5)


def test_before_loop_can_replace_the_latents(tiny):
    s, lat, cond, uncond = _setup(tiny)
    other = torch.randn(lat.shape, generator=torch.Generator().manual_seed(9))

    class Swap(BaseHook):
        def before_loop(self, ctx):
            return other

    swapped, _ = run_loop(s, lat, cond, uncond, [7.5, 7.5], 3, hooks=[Swap()])
    direct, _ = run_loop(s, other, cond, uncond, [7.5, 7.5], 3)
    assert torch.equal(swapped, direct)
