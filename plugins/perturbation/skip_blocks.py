from diffusers.hooks._helpers import TransformerBlockRegistry

from stablefused.perturbations import Perturbation
from stablefused.registry import register


@register("perturbation", "skip_blocks")
class SkipBlocks(Perturbation):
    """Transformer blocks skipped: a block's output is its input (SLG's / STG's perturbation).

    Skip-layer guidance as in Stable Diffusion 3.5 (``StableDiffusion3Pipeline(skip_guidance_layers=...)``:
    the listed blocks are not run for the perturbed prediction) and Hyung et al. 2024, "Spatiotemporal Skip
    Guidance" (arXiv:2411.18664). The block's inputs are returned in its output layout, as diffusers'
    ``TransformerBlockSkipHook`` does (UNet ``BasicTransformerBlock``: hidden states; SD3/Flux blocks:
    hidden and encoder hidden states), so it works on every block diffusers' registry knows. Defaults:
    blocks 7, 8, 9 on SD3/Flux (the SD 3.5 Medium recipe), the mid block's transformer blocks on UNets.
    """

    target = "block"
    defaults = {"sd": ["mid"], "video": ["mid"], "sdxl": ["mid"], "sd3": [7, 8, 9], "flux": [7, 8, 9]}

    def forward(self, module, original, args, kwargs):
        meta = TransformerBlockRegistry.get(type(module))
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        out = [None, None]
        out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = hidden, encoder
        return tuple(out)
