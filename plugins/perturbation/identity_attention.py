from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

from stablefused.perturbations import Perturbation
from stablefused.registry import register


@register("perturbation", "identity_attention")
class IdentityAttention(Perturbation):
    """Self-attention with its score matrix replaced by the identity (PAG's perturbation).

    Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (arXiv:2403.17377),
    §3.2: Softmax(Q Kᵀ / √d) is replaced by I, so the attention output is V (then the output projection).
    Computed as diffusers does (``AttentionScoreSkipFunctionMode``): the module's own forward, with
    ``scaled_dot_product_attention`` returning V wherever queries and values have the same length, so any
    self-attention module works (UNet ``attn1``, SD3 joint attention, Flux attention). Default layers: the
    mid block on UNets (``StableDiffusionPAGPipeline``'s ``pag_applied_layers=["mid"]``), ``blocks.1`` on SD3
    (``StableDiffusion3PAGPipeline``).
    """

    def forward(self, module, original, args, kwargs):
        fast = _identity_fast(module, args, kwargs)
        if fast is not None:
            return fast
        with AttentionScoreSkipFunctionMode():
            return original(*args, **kwargs)


def _identity_fast(module, args, kwargs):
    """A plain diffusers self-attention (``Attention`` + ``AttnProcessor2_0``, UNets' ``attn1``) on (B, N, C)
    tokens: V then the output projection, as ``PAGIdentitySelfAttnProcessor2_0``'s perturbed path — the same
    values as the score-skipping forward without computing Q and K. None: use that forward."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    x = args[0] if args else kwargs.get("hidden_states")
    if (type(module) is not Attention or type(module.processor) is not AttnProcessor2_0 or module.is_cross_attention
            or module.spatial_norm is not None or x is None or x.ndim != 3 or len(args) > 1
            or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "attention_mask", "temb"))):
        return None
    h = x if module.group_norm is None else module.group_norm(x.transpose(1, 2)).transpose(1, 2)
    h = module.to_out[1](module.to_out[0](module.to_v(h)))
    if module.residual_connection:
        h = h + x
    return h / module.rescale_output_factor
