"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``StableDiffusion3Img2ImgPipeline``,
``StableDiffusion3InpaintPipeline``): an MMDiT (``SD3Transformer2DModel``) with joint text-image attention,
conditioned on

* ``encoder_hidden_states``: CLIP-L and CLIP-G penultimate hidden states concatenated on the feature axis,
  zero-padded to T5's width, then T5-XXL's last hidden state appended on the sequence axis (zeros of that
  shape when the model has no ``text_encoder_3``, as the pipeline does);
* ``pooled_projections``: CLIP-L's and CLIP-G's projected pooled outputs, concatenated;

predicting the flow-matching velocity v = ε − x0 under ``FlowMatchEulerDiscreteScheduler`` (its ``shift``
read from the model's scheduler config). The VAE has 16 latent channels and a ``shift_factor`` (handled by
:meth:`Family.image_latents` / :meth:`Family.decode`).

The tiny random model ``tiny_sd3`` (``model=tiny_sd3``) is built here from diffusers' fast-test configs for
``StableDiffusion3Pipeline``, widened to SD3's 16 latent channels, patch size 2 and the 3.5 architecture
(a dual-attention layer, RMS q/k norm), with tokenizers built offline.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stablefused.families import Conditioning, Family, register_family

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default T5 length (at most 512)

SD3_LATENT_RGB = [  # comfy/latent_formats.py, class SD3: rgb in [-1, 1] per latent channel
    [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
]
SD3_LATENT_RGB_BIAS = [0.2394, 0.2135, 0.1925]


def clip_embeds(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], window: int,
                device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden state, projected pooled output) of a ``CLIPTextModelWithProjection``, as
    ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` computes them (no clip skip)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=window, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def joint_embeds(l_seq: torch.Tensor, l_pooled: torch.Tensor, g_seq: torch.Tensor, g_pooled: torch.Tensor,
                 t5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompt``'s assembly: CLIP-L and CLIP-G hidden states side by side, zero-padded to T5's width, T5's
    tokens appended; the pooled outputs concatenated. (Also what the scenes_flow training feeds its transformer.)"""
    clip = torch.cat([l_seq, g_seq], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


@register_family
class SD3(Family):
    """SD3 / SD3.5: ``StableDiffusion3Pipeline`` and its img2img/inpaint pipelines."""

    name = "sd3"
    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae")
    optional = ("tokenizer_3", "text_encoder_3")
    pipelines = ("StableDiffusion3",)
    reference = "StableDiffusion3Pipeline"
    attention = "joint"
    settings = {"max_sequence_length": None}  # T5 tokens (1..512); null: DEFAULT_MAX_SEQUENCE_LENGTH

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def max_sequence_length(self) -> int:
        """``model.max_sequence_length``, else the built model's own (tiny_sd3), else 256."""
        return int((self.c.info.get("model") or {}).get("max_sequence_length") or self.c.info.get("max_sequence_length")
                   or DEFAULT_MAX_SEQUENCE_LENGTH)

    def latent_rgb(self) -> tuple[list, list, str] | None:
        """The SD3/3.5 VAE (16 channels, scaling 1.5305, shift 0.0609, 4 blocks): ComfyUI's published coefficients
        (``comfy/latent_formats.py``, class ``SD3``). Other VAEs: fitted."""
        cfg = self.c.vae.config
        if (cfg.latent_channels == 16 and abs(float(cfg.scaling_factor) - 1.5305) < 1e-6
                and abs(float(cfg.get("shift_factor") or 0.0) - 0.0609) < 1e-6 and len(cfg.block_out_channels) == 4):
            return SD3_LATENT_RGB, SD3_LATENT_RGB_BIAS, "sd3 known coefficients (ComfyUI)"
        return None

    # ------------------------------------------------------------------ the network
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, **network_kw: Any) -> torch.Tensor:
        """The transformer on rows ``x``; the timestep expanded per row, as the pipeline does.
        ``network_kw`` go to the transformer as they are (e.g. ``skip_layers`` for skip-layer guidance)."""
        return self.network(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=cond.embeds,
                            pooled_projections=cond.rows["pooled_projections"], return_dict=False, **network_kw)[0]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool = False) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` for one prompt per row (the same prompt to all three
        encoders; negative prompts are encoded the same way, as the pipeline does)."""
        c = self.c
        window = int(c.tokenizer.model_max_length)  # the pipeline's tokenizer_max_length, for both CLIPs
        l_seq, l_pooled = clip_embeds(c.tokenizer, c.text_encoder, prompts, window, c.device)
        g_seq, g_pooled = clip_embeds(c.modules["tokenizer_2"], c.modules["text_encoder_2"], prompts, window, c.device)
        seq, pooled = joint_embeds(l_seq, l_pooled, g_seq, g_pooled, self._t5(prompts))
        return Conditioning({"encoder_hidden_states": seq, "pooled_projections": pooled}).to(dtype=c.dtype)

    def _t5(self, prompts: Sequence[str]) -> torch.Tensor:
        """``_get_t5_prompt_embeds``: T5's last hidden state at ``max_sequence_length`` tokens (no attention
        mask), or zeros of that shape when the model has no T5 (``text_encoder_3=None``)."""
        c, n = self.c, self.max_sequence_length
        encoder = c.modules.get("text_encoder_3")
        if encoder is None:
            width = int(self.network.config.joint_attention_dim)
            return torch.zeros((len(prompts), n, width), device=c.device, dtype=c.text_encoder.dtype)
        ids = c.modules["tokenizer_3"](list(prompts), padding="max_length", max_length=n, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(c.device))[0]

    # ------------------------------------------------------------------ latents and scheduler
    @property
    def size_multiple(self) -> int:
        """Sizes must be multiples of VAE factor x patch size (the pipeline's ``check_inputs``)."""
        return self.vae_scale_factor * int(self.network.config.patch_size)

    def set_timesteps(self, scheduler: Any, steps: int, height: int, width: int) -> None:
        """The pipeline's ``retrieve_timesteps``; a scheduler config with ``use_dynamic_shifting`` gets the
        resolution-dependent ``mu`` the SD3 pipeline computes (SD3/3.5 use a fixed ``shift``)."""
        kw = {}
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            p, f = int(self.network.config.patch_size), self.vae_scale_factor
            seq = (int(height) // f // p) * (int(width) // f // p)
            kw["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=self.c.device, **kw)

    # ------------------------------------------------------------------ what works where
    @classmethod
    def unsupported(cls, cfg: Any) -> list[str]:
        out = []
        sched = (cfg.get("scheduler") or {}).get("cls")
        if sched and not str(sched).startswith("FlowMatch"):
            out.append(f"scheduler={cfg.scheduler.get('name', sched)}: {sched} is not a flow-matching scheduler; an "
                       f"{cls.name} model needs one: scheduler=default (its FlowMatchEulerDiscreteScheduler) or "
                       "scheduler=flow_heun")
        if cfg.get("task") == "txt2video":
            out.append(f"task=txt2video: needs a text-to-video model (model=zeroscope), not an {cls.name} model")
        msl = (cfg.get("model") or {}).get("max_sequence_length")
        if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512):
            out.append(f"model.max_sequence_length={msl!r}: T5 tokens, an integer in 1..512 (null: 256)")
        if (cfg.get("model") or {}).get("prediction_type"):
            out.append(f"model.prediction_type={cfg.model.prediction_type}: {cls.name} models predict flow; leave it "
                       "null")
        return out


# ---------------------------------------------------------------------------------------------- tiny model
T5_WORDS = ("<pad>", "</s>", "<unk>")


def build_t5_tokenizer(words: Sequence[str], model_max_length: int = 512) -> Any:
    """A T5-like word-level tokenizer built offline (``tokenizers`` WordLevel in a
    ``PreTrainedTokenizerFast``): pad = 0, EOS = 1 appended to every sequence, unknown words = 2."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*T5_WORDS, *(w.lower() for w in words)]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def build_tiny(seed: int = 0, t5: bool = True, max_sequence_length: int = 24, in_channels: int = 16) -> Any:
    """A tiny SD3.5-shaped model with random weights (diffusers' SD3 fast-test sizes; 16 latent channels,
    patch size 2, VAE factor 2: 16x16 images, 8x8 latents, 16 image tokens), SD3's scheduler config (shift 3).
    ``t5=False``: no T5 (``text_encoder_3=None``); ``in_channels=33``: an inpainting transformer (latents +
    mask + masked-image latents)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from stablefused.models import TINY_WORDS, Components, _scheduler_dict
    from stablefused.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(TINY_WORDS, model_max_length=16)

    def clip(hidden: int, projection: int) -> Any:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer) + 8,
            max_position_embeddings=16, hidden_act="gelu", projection_dim=projection))

    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = clip(16, 16), clip(32, 24)  # CLIP-L / CLIP-G stand-ins (different widths)
    tokenizer_3 = build_t5_tokenizer(TINY_WORDS) if t5 else None
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3) + 4, d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)) if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=in_channels, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=16 + 24,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3/3.5's config
    modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                   text_encoder_2=text_encoder_2, tokenizer_3=tokenizer_3, text_encoder_3=text_encoder_3,
                   transformer=transformer, vae=vae)
    return Components("tiny_sd3", modules, _scheduler_dict(scheduler), torch.device("cpu"), torch.float32,
                      source="builtin:tiny_sd3", info={"max_sequence_length": max_sequence_length}, family_name="sd3")


def _register() -> None:
    from stablefused.models import BUILTIN_MODELS

    BUILTIN_MODELS["tiny_sd3"] = build_tiny


_register()
