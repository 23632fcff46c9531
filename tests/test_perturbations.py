"""Perturbations on transformer families (SD3's MMDiT, Flux) as on UNets: each applies to its rows inside one
batch and leaves the other rows exactly as the unperturbed network computes them; skip_blocks equals SD3's own
``skip_layers`` (what StableDiffusion3Pipeline's skip_guidance_layers uses); layers by name or index."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from stablefused import registry
from stablefused.perturbations import candidates, perturbed_rows, select

KINDS = [("identity_attention", {}), ("blurred_queries", {"sigma": 1.0}), ("blurred_queries", {}),
         ("skip_blocks", {}), ("attention_dropout", {"p": 0.5})]


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4).double().eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
              encoder_hidden_states=torch.randn(3, 5, 16, generator=g, dtype=torch.float64),
              pooled_projections=torch.randn(3, 8, generator=g, dtype=torch.float64),
              timestep=torch.tensor([500.0, 500.0, 500.0], dtype=torch.float64))
    return net, kw


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    net = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                 axes_dims_rope=(2, 2, 4)).double().eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(3, 16, 8, generator=g, dtype=torch.float64),
              encoder_hidden_states=torch.randn(3, 5, 16, generator=g, dtype=torch.float64),
              pooled_projections=torch.randn(3, 8, generator=g, dtype=torch.float64),
              timestep=torch.full((3,), 0.5, dtype=torch.float64),
              img_ids=torch.zeros(16, 3, dtype=torch.float64), txt_ids=torch.zeros(5, 3, dtype=torch.float64))
    return net, kw


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name,params", KINDS, ids=lambda x: str(x))
def test_transformer_perturbation_changes_only_its_rows(request, family, name, params):
    net, kw = request.getfixturevalue(family)
    p = registry.create("perturbation", name, layers=[0, 1], **params)
    with torch.no_grad():
        plain = net(**kw, return_dict=False)[0]
        with perturbed_rows(net, family, [(p, torch.tensor([2]))]):
            mixed = net(**kw, return_dict=False)[0]
        after = net(**kw, return_dict=False)[0]
    # the other rows: as without the perturbation, up to the rounding of a smaller batch in the perturbed modules
    torch.testing.assert_close(mixed[:2], plain[:2], rtol=0, atol=1e-13)
    assert (mixed[2] - plain[2]).abs().max() > 1e-6  # the perturbed row changed
    assert torch.equal(after, plain)  # nothing left installed


def test_skip_blocks_equals_sd3_skip_layers(sd3):
    net, kw = sd3
    p = registry.create("perturbation", "skip_blocks", layers=[1, 2])
    with torch.no_grad():
        with perturbed_rows(net, "sd3", [(p, torch.arange(3))]):
            ours = net(**kw, return_dict=False)[0]
        theirs = net(**kw, skip_layers=[1, 2], return_dict=False)[0]
    assert torch.equal(ours, theirs)


def test_layers_by_name_index_and_family_defaults(sd3):
    net, _ = sd3
    names = lambda sel: [n for n, _ in sel]  # noqa: E731
    assert names(select(net, "attention", [1])) == ["transformer_blocks.1.attn"]
    assert names(select(net, "block", [r"transformer_blocks\.3$", 0])) == ["transformer_blocks.3", "transformer_blocks.0"]
    p = registry.create("perturbation", "identity_attention")
    assert names(p.modules(net, "sd3")) == ["transformer_blocks.1.attn"]  # StableDiffusion3PAGPipeline's "blocks.1"
    assert len(candidates(net, "block")) == 4
    with pytest.raises(ValueError, match="selects no attention module"):
        select(net, "attention", ["mid"])
    with pytest.raises(ValueError, match="out of range"):
        select(net, "block", [9])
