"""Model perturbations: a weaker version of the network for chosen rows of a batch (PAG, SEG, SLG, ...).

A perturbation (plugin kind ``perturbation``) selects modules of the network (self-attention modules, or
transformer blocks) by name or index, and says how those modules compute for a perturbed row::

    class Perturbation:
        target = "attention" | "block"          # what ``layers`` selects among
        defaults = {"sd": ["mid"], ...}           # per model family, when ``layers`` is not given
        def forward(self, module, original, args, kwargs)   # the module's output for perturbed rows only

:func:`perturbed_rows` applies perturbations to their rows *inside one network call*, as diffusers' PAG
attention processors do: each selected module runs its original forward on the rows no perturbation claims
and :meth:`Perturbation.forward` on each perturbation's rows, and the outputs are put back in batch order. No
row computes anything it does not use; the other rows see exactly their usual computation, on a smaller batch
in the selected modules (equal to the unperturbed network up to the rounding of a batch-size-dependent matrix
product: one ulp in float64, tested).

``layers`` entries: a string is a regular expression searched in the module names (``"mid"``,
``"down_blocks.2"``, ``"transformer_blocks.1"``), with diffusers' PAG rule that ``blocks.1`` does not select
``blocks.10`` when both names end in numbers; an int is an index into the list of candidate modules in
``named_modules`` order (``target="attention"``: the self-attention modules, UNet ``attn1``; ``"block"``: the
transformer blocks, UNet ``transformer_blocks.N``, SD3/Flux ``transformer_blocks.N`` then
``single_transformer_blocks.N``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from stablefused.registry import register

__all__ = ["Perturbation", "perturbed_rows", "register"]

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
PER_ROW_KWARGS = ("hidden_states", "encoder_hidden_states", "temb", "timestep", "attention_mask",
                  "encoder_attention_mask", "class_labels")


def _is_self_attention(module: torch.nn.Module) -> bool:
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return isinstance(module, _ATTENTION_CLASSES) and not getattr(module, "is_cross_attention", False)


def _is_block(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in BLOCK_LISTS


def _fake_integral_match(layer: str, name: str) -> bool:
    a, b = layer.split(".")[-1], name.split(".")[-1]
    return a.isnumeric() and b.isnumeric() and a == b


def candidates(network: torch.nn.Module, target: str) -> list[tuple[str, torch.nn.Module]]:
    """The modules ``layers`` chooses among, in ``named_modules`` order."""
    if target == "attention":
        return [(n, m) for n, m in network.named_modules() if _is_self_attention(m)]
    if target == "block":
        return [(n, m) for n, m in network.named_modules() if _is_block(n)]
    raise ValueError(f"perturbation target {target!r}: must be attention or block")


def select(network: torch.nn.Module, target: str, layers: Sequence[str | int]) -> list[tuple[str, torch.nn.Module]]:
    """The modules ``layers`` names (regular expressions and indices, see the module docstring)."""
    pool = candidates(network, target)
    chosen: dict[str, torch.nn.Module] = {}
    for layer in layers:
        if isinstance(layer, int):
            if not -len(pool) <= layer < len(pool):
                raise ValueError(f"layers: index {layer} out of range; this network has {len(pool)} {target} modules")
            found = [pool[layer]]
        else:
            found = [(n, m) for n, m in pool if re.search(str(layer), n) and not _fake_integral_match(str(layer), n)]
        if not found:
            names = ", ".join(n for n, _ in pool[:6]) + (", ..." if len(pool) > 6 else "")
            raise ValueError(f"layers: {layer!r} selects no {target} module of {type(network).__name__} ({names})")
        chosen.update(found)
    return list(chosen.items())


class Perturbation:
    """Base class: module selection; subclasses implement :meth:`forward` (and set ``target``/``defaults``)."""

    target = "attention"
    defaults: dict[str, list] = {"sd": ["mid"], "video": ["mid"], "sdxl": ["mid"], "sd3": ["blocks.1"],
                                 "flux": ["transformer_blocks.0"]}

    def __init__(self, layers: list | None = None):
        self.layers = None if layers is None else list(layers)
        self._cache: tuple[int, list] | None = None

    def layers_for(self, family_name: str) -> list:
        if self.layers is not None:
            return self.layers
        return self.defaults.get(family_name) or self.defaults["sd"]

    def modules(self, network: torch.nn.Module, family_name: str) -> list[tuple[str, torch.nn.Module]]:
        if self._cache is None or self._cache[0] != id(network):
            self._cache = (id(network), select(network, self.target, self.layers_for(family_name)))
        return self._cache[1]

    def forward(self, module: torch.nn.Module, original: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError


def _rows(x: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch:
        return x.index_select(0, index)
    return x


def _merge(outs: list[Any], indices: list[torch.Tensor], batch: int) -> Any:
    """One batch-sized output whose rows ``indices[k]`` are ``outs[k]`` (the index sets partition the batch)."""
    first = outs[0]
    if isinstance(first, tuple):
        return tuple(_merge([o[k] for o in outs], indices, batch) for k in range(len(first)))
    if first is None or (len(outs) == 1 and len(indices[0]) == batch):
        return first
    merged = first.new_empty((batch, *first.shape[1:]))
    for out, index in zip(outs, indices):
        merged.index_copy_(0, index, out)
    return merged


def _per_row_forward(module: torch.nn.Module, original: Any, groups: list[tuple[Perturbation, torch.Tensor]]) -> Any:
    """The module's forward for a batch where ``groups`` rows are perturbed: the original forward on the other
    rows, each perturbation's forward on its rows, reassembled in batch order (diffusers' PAG processors split
    the batch the same way: original attention on [uncond, cond], the perturbed path on the rest)."""

    def forward(*args, **kwargs):
        lead = args[0] if args else kwargs["hidden_states"]
        batch = lead.shape[0]
        keep = torch.ones(batch, dtype=torch.bool, device=lead.device)
        for _, index in groups:
            keep[index] = False
        outs, indices = [], []
        for perturbation, index in [(None, keep.nonzero().flatten()), *groups]:  # None: the unperturbed rows
            if len(index) == 0:
                continue
            a = tuple(_rows(x, index, batch) for x in args)
            k = {n: (_rows(v, index, batch) if n in PER_ROW_KWARGS else v) for n, v in kwargs.items()}
            outs.append(original(*a, **k) if perturbation is None else perturbation.forward(module, original, a, k))
            indices.append(index)
        return _merge(outs, indices, batch)

    return forward


@contextmanager
def perturbed_rows(network: torch.nn.Module, family_name: str,
                   active: Sequence[tuple[Perturbation, torch.Tensor]]) -> Iterator[None]:
    """Inside this context, each perturbation in ``active`` applies to its rows (index tensors into the batch
    of the next network calls) and every other row computes as usual."""
    groups: dict[int, tuple[torch.nn.Module, list]] = {}
    for perturbation, index in active:
        if len(index):
            for _, module in perturbation.modules(network, family_name):
                groups.setdefault(id(module), (module, []))[1].append((perturbation, index))
    saved = []
    try:
        for module, group in groups.values():
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _per_row_forward(module, module.forward, group)
        yield
    finally:
        for module, forward in reversed(saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
