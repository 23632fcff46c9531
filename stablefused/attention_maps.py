"""A self-attention map read out of a network call, for guiders that need more than the prediction (SAG).

:func:`self_attention_map` watches one self-attention module (chosen as perturbations choose them,
:func:`stablefused.perturbations.select`; the first match) during the next network call and recomputes, on
the side, its softmax attention probabilities from the module's input, as ``StableDiffusionSAGPipeline``'s
``CrossAttnStoreProcessor`` computes them (``to_q``/``to_k``, ``get_attention_scores``). The module's own
output is not touched, so the call's predictions are what they are without the watch. The map is averaged
over heads and its key axis laid out on the token grid: (B, N, h, w), query × key position, where (h, w) is
the spatial size of the input of the transformer holding the module (the pipeline reads it from
``mid_block.attentions[0]``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from stablefused.perturbations import select


def _lead(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def self_attention_map(network: torch.nn.Module, layer: str | None) -> Iterator[dict[str, Any]]:
    """Inside: the next network call puts its map, (B, N, h, w), under ``"map"`` of the yielded dict.
    ``layer``: a regular expression for the module's name (``"mid_block"``); None: watch nothing."""
    seen: dict[str, Any] = {}
    if layer is None:
        yield seen
        return
    name, attn = select(network, "attention", [layer])[0]
    holder = network.get_submodule(name.split(".transformer_blocks.")[0])

    def grid(_module, args, kwargs):
        x = _lead(args, kwargs)
        if x.ndim != 4:
            raise ValueError(f"attention map: {name} is not in a transformer over a 2-D grid (its input is {x.ndim}-D)")
        seen["size"] = tuple(x.shape[-2:])

    def probs(module, args, kwargs):
        x = _lead(args, kwargs)
        q, k = module.head_to_batch_dim(module.to_q(x)), module.head_to_batch_dim(module.to_k(x))
        p = module.get_attention_scores(q, k, None)
        seen["map"] = p.reshape(x.shape[0], module.heads, x.shape[1], x.shape[1]).mean(1).unflatten(-1, seen["size"])

    handles = [holder.register_forward_pre_hook(grid, with_kwargs=True),
               attn.register_forward_pre_hook(probs, with_kwargs=True)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
