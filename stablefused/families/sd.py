"""SD 1.x/2.x (``StableDiffusionPipeline``) and UNet3D text-to-video (``TextToVideoSDPipeline``): a UNet
conditioned on one CLIP text encoder's last hidden state, predicting ε or v."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stablefused.families import Conditioning, Family, register_family


def clip_hidden_states(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], device: Any) -> torch.Tensor:
    """The text encoder's last hidden state for prompts padded to the tokenizer's window, as
    ``StableDiffusionPipeline.encode_prompt`` computes it (no clip skip, no attention mask)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


@register_family
class SD(Family):
    """Stable Diffusion 1.x/2.x: ``StableDiffusionPipeline`` (and its img2img/inpaint pipelines)."""

    name = "sd"
    components = ("tokenizer", "text_encoder", "unet", "vae")
    pipelines = ("StableDiffusion", "AltDiffusion")
    reference = "StableDiffusionPipeline"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        c = self.c
        emb = clip_hidden_states(c.tokenizer, c.text_encoder, prompts, c.device)
        return Conditioning({"encoder_hidden_states": emb.to(c.dtype)})

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.network(x, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]


@register_family
class Video(SD):
    """UNet3D text-to-video (zeroscope, modelscope): ``TextToVideoSDPipeline``; 5-D latents (B, C, F, H, W)."""

    name = "video"
    pipelines = ("TextToVideoSD", "VideoToVideoSD")
    reference = "TextToVideoSDPipeline"
