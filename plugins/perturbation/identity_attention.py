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
        with AttentionScoreSkipFunctionMode():
            return original(*args, **kwargs)
