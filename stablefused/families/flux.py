"""Flux.1 (schnell and dev): ``FluxPipeline`` / ``FluxImg2ImgPipeline`` / ``FluxInpaintPipeline``.

A ``FluxTransformer2DModel`` conditioned on T5's last hidden state (the sequence) and CLIP's pooled output,
predicting the flow velocity v = ε − x0 on latents packed 2x2 into tokens ((B, C, H, W) → (B, H/2·W/2, 4C);
:meth:`Flux.from_spatial` / :meth:`Flux.to_spatial` are the pipeline's ``_pack_latents`` / ``_unpack_latents``:
the loop keeps latents packed, hooks, previews and the VAE see them spatial). Position ids: ``txt_ids``
(zeros, one row per text token, shared by every row) and ``img_ids`` (the packed grid's row/column).

Timesteps (:meth:`Flux.set_timesteps`): ``sigmas = linspace(1, 1/steps, steps)`` shifted by
``mu = calculate_shift(image tokens)`` from the scheduler config's base/max shift and sequence lengths.

Guidance: FLUX.1-dev is guidance-distilled: its transformer takes the wanted guidance strength as an input
(``guidance_embeds``; ``model.distilled_guidance``, the pipeline's ``guidance_scale``, default 3.5);
schnell has no such input. The per-sample guidance scale w of StableFused drives *true* classifier-free
guidance with the negative prompt (the pipeline's ``true_cfg_scale`` + ``negative_prompt``), so w = 1 is the
conditional pass alone (exactly ``FluxPipeline`` without true CFG), and 0 / negative / any schedule or rule
mean what they mean on SD.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from stablefused.families import Conditioning, Family, register_family

DISTILLED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the dev transformer's guidance input)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length: T5 tokens


def shift_mu(config: Any, image_tokens: int) -> float:
    """The resolution-dependent shift of ``image_tokens`` packed tokens (``calculate_shift`` with the scheduler
    config's base/max sequence lengths and shifts, as the Flux pipelines call it)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))

FLUX_LATENT_RGB = [  # comfy/latent_formats.py, class Flux: rgb in [-1, 1] per latent channel
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
]
FLUX_LATENT_RGB_BIAS = [-0.0329, -0.0718, -0.0851]

@register_family
class Flux(Family):
    """Flux.1: ``FluxPipeline`` (and its img2img/inpaint pipelines)."""

    name = "flux"
    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae")
    pipelines = ("Flux",)
    reference = "FluxPipeline"
    attention = "joint"  # MMDiT joint attention: no separate text→image cross-attention maps
    cfg_in_one_call = False  # FluxPipeline's true CFG: a call for the prompt, then one for the negative prompt
    settings = {"distilled_guidance": None}  # dev's guidance input (null: DISTILLED_GUIDANCE); schnell has none

    def __init__(self, c: Any):
        super().__init__(c)
        self.grid: tuple[int, int] | None = None  # packed token grid (h/2, w/2) of the batch being sampled
        self._img_ids: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def distilled_guidance(self) -> float | None:
        """The guidance input of a guidance-distilled transformer (dev), None for one without (schnell)."""
        if not self.network.config.get("guidance_embeds"):
            return None
        value = (self.c.info.get("model") or {}).get("distilled_guidance")
        return float(DISTILLED_GUIDANCE if value is None else value)

    def latent_rgb(self) -> tuple[list, list, str] | None:
        """The FLUX.1 VAE (16 channels, scaling 0.3611, shift 0.1159): ComfyUI's published coefficients
        (``comfy/latent_formats.py``, class ``Flux``). Other VAEs: fitted."""
        cfg = self.c.vae.config
        if (cfg.latent_channels == 16 and abs(float(cfg.scaling_factor) - 0.3611) < 1e-6
                and abs(float(cfg.get("shift_factor") or 0.0) - 0.1159) < 1e-6 and len(cfg.block_out_channels) == 4):
            return FLUX_LATENT_RGB, FLUX_LATENT_RGB_BIAS, "flux known coefficients (ComfyUI)"
        return None

    @property
    def tokenizer(self) -> Any:
        """T5's tokenizer: it carries the prompt (CLIP gives only the pooled vector, from 77 tokens)."""
        return self.c.modules["tokenizer_2"]

    @property
    def max_sequence_length(self) -> int:
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer.model_max_length))

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        """``FluxPipeline.encode_prompt``: CLIP's pooled output and T5's last hidden state (padded to
        ``max_sequence_length``), ``txt_ids`` zeros; plus the distilled guidance per row (dev)."""
        c, prompts = self.c, list(prompts)
        tok, te = c.modules["tokenizer"], c.modules["text_encoder"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pooled = te(ids.to(c.device), output_hidden_states=False).pooler_output.to(te.dtype)
        tok2, te2 = c.modules["tokenizer_2"], c.modules["text_encoder_2"]
        ids2 = tok2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids
        seq = te2(ids2.to(c.device), output_hidden_states=False)[0].to(te2.dtype)
        rows = {"encoder_hidden_states": seq.to(c.device, c.dtype), "pooled_projections": pooled.to(c.device, c.dtype)}
        g = self.distilled_guidance
        if g is not None:  # float32 as the pipeline makes it (the transformer casts it)
            rows["guidance"] = torch.full((len(prompts),), g, device=c.device, dtype=torch.float32)
        txt_ids = torch.zeros(seq.shape[1], 3, device=c.device, dtype=te.dtype)
        return Conditioning(rows, {"txt_ids": txt_ids})

    # ------------------------------------------------------------------ the network
    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def in_channels(self) -> int:
        """Latent channels the transformer takes, unpacked (its ``in_channels`` counts 2x2 packed ones)."""
        return int(self.network.config.in_channels) // 4

    def img_ids(self, x: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline._prepare_latent_image_ids`` for the packed grid of this batch."""
        from diffusers import FluxPipeline

        h, w = self.grid_for(x.shape[1])
        key = (h, w, x.device, x.dtype)
        if self._img_ids is None or self._img_ids[0] != key:
            self._img_ids = (key, FluxPipeline._prepare_latent_image_ids(x.shape[0], h, w, x.device, x.dtype))
        return self._img_ids[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return self.network(
            hidden_states=x, timestep=timestep / 1000, guidance=cond.rows.get("guidance"),
            pooled_projections=cond.rows["pooled_projections"], encoder_hidden_states=cond.embeds,
            txt_ids=cond.shared["txt_ids"], img_ids=self.img_ids(x), joint_attention_kwargs={}, return_dict=False,
        )[0]

    def input_problem(self, latents: torch.Tensor, extra: torch.Tensor | None) -> str | None:
        need, have = int(self.network.config.in_channels), latents.shape[-1]
        if latents.ndim != 3:
            return f"Flux takes packed latents (B, tokens, {need}), got shape {tuple(latents.shape)}"
        if extra is not None:
            return "Flux's transformer takes no extra input channels (Flux Fill models are not supported)"
        if need != have:
            return f"its transformer takes {need} packed channels, these latents have {have}"
        return None

    # ------------------------------------------------------------------ latents and scheduler
    @property
    def default_size(self) -> int:
        return 128 * self.vae_scale_factor  # FluxPipeline.default_sample_size: 1024 px

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # latents packed 2x2

    def latent_shape(self, n: int, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """``FluxPipeline.prepare_latents``: the spatial noise, its sides rounded down to even latent pixels."""
        f = self.vae_scale_factor
        return (n, self.latent_channels, 2 * (height // (2 * f)), 2 * (width // (2 * f)))

    def set_timesteps(self, scheduler: Any, steps: int, height: int, width: int) -> None:
        """``FluxPipeline.__call__`` step 5: ``sigmas = linspace(1, 1/steps, steps)`` (the scheduler's own
        with ``use_flow_sigmas``) and the resolution-dependent shift ``mu`` of the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        f = self.vae_scale_factor
        self.grid = (height // f // 2, width // f // 2)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = shift_mu(scheduler.config, self.grid[0] * self.grid[1])
        retrieve_timesteps(scheduler, steps, self.c.device, sigmas=sigmas, mu=mu)

    def sigmas(self, scheduler: Any) -> list[float]:
        """The flow time s of every step as an EDM σ = s / (1 − s) (inf at s = 1)."""
        s = [float(v) for v in scheduler.sigmas[: len(scheduler.timesteps)]]
        return [float("inf") if v >= 1 else v / (1 - v) for v in s]

    def grid_for(self, tokens: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == tokens:
            return self.grid
        side = int(round(tokens ** 0.5))
        if side * side == tokens:
            return side, side
        raise ValueError(f"Flux: {tokens} packed tokens do not match the image size set by Sampler.prepare "
                         f"({self.grid}); call prepare(height=, width=) for this batch")

    def from_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline._pack_latents``: (B, C, H, W) → (B, H/2·W/2, 4C)."""
        from diffusers import FluxPipeline

        b, ch, h, w = latents.shape
        self.grid = (h // 2, w // 2)
        return FluxPipeline._pack_latents(latents, b, ch, h, w)

    def to_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline._unpack_latents``: (B, H/2·W/2, 4C) → (B, C, H, W)."""
        from diffusers import FluxPipeline

        if latents.ndim != 3:
            return latents
        h, w = self.grid_for(latents.shape[1])
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(latents, 2 * h * f, 2 * w * f, f)

    # ------------------------------------------------------------------ what works where
    @classmethod
    def unsupported(cls, cfg: Any) -> list[str]:
        out = []
        if "attention" in (cfg.get("recorders") or {}):
            out.append("recorders.attention: Flux has joint (MMDiT) attention, no text→image cross-attention "
                       "maps to record; drop recorders=attention for this model")
        scheduler = (cfg.get("scheduler") or {}).get("cls")
        if scheduler and not str(scheduler).startswith("FlowMatch"):
            out.append(f"scheduler={cfg.scheduler.get('name')}: {scheduler} is not a flow-matching scheduler; Flux runs "
                       "FlowMatchEulerDiscreteScheduler (scheduler=default)")
        g = (cfg.get("model") or {}).get("distilled_guidance")
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g)):
            out.append(f"model.distilled_guidance={g!r}: must be a number (the dev transformer's guidance input, "
                       f"default {DISTILLED_GUIDANCE})")
        return out


# ---------------------------------------------------------------------------------------- tiny test models
# The scheduler configs of the released models (scheduler/scheduler_config.json)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = {**DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def build_t5_word_tokenizer(words: Sequence[str], model_max_length: int = 32) -> Any:
    """A T5-like word-level tokenizer built offline (``tokenizers`` WordLevel in a ``PreTrainedTokenizerFast``):
    ids 0 = <pad>, 1 = </s> (appended to every text, as T5 does), 2 = <unk>, then the words."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True, scheduler: dict | None = None,
                    name: str = "tiny_flux") -> Any:
    """A tiny Flux-shaped model with random weights, built in code (tests): diffusers' FluxPipeline fast-test
    transformer (1 double + 1 single block, 2 heads of 16, rope axes 4/4/8) on 16 latent channels (packed 64),
    tiny CLIP and T5 encoders, a 2x VAE with the real Flux VAE's scaling/shift factors. ``guidance_embeds``:
    dev-style (True) or schnell-style (False); ``scheduler``: its FlowMatchEulerDiscreteScheduler config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from stablefused.models import TINY_WORDS, Components, _scheduler_dict
    from stablefused.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    tokenizer_2 = build_t5_word_tokenizer(TINY_WORDS, model_max_length=24)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer) + 8, max_position_embeddings=16, projection_dim=32,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2) + 8, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    ))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    sched = FlowMatchEulerDiscreteScheduler(**(scheduler or DEV_SCHEDULER))
    modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                   text_encoder_2=text_encoder_2, transformer=transformer, vae=vae)
    return Components(name, modules, _scheduler_dict(sched), torch.device("cpu"), torch.float32,
                      source=f"builtin:{name}", family_name="flux")


def build_tiny_flux_schnell(seed: int = 0) -> Any:
    """Schnell-style: no guidance input, schnell's scheduler config (shift 1, no dynamic shifting)."""
    return build_tiny_flux(seed, guidance_embeds=False, scheduler=SCHNELL_SCHEDULER, name="tiny_flux_schnell")


def _register() -> None:
    from stablefused.models import BUILTIN_MODELS

    for builder in (build_tiny_flux, build_tiny_flux_schnell):
        builder.family = "flux"  # read before loading (stablefused.families.family_of_config)
    BUILTIN_MODELS["tiny_flux"] = build_tiny_flux
    BUILTIN_MODELS["tiny_flux_schnell"] = build_tiny_flux_schnell


_register()
