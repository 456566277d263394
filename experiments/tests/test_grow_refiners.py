"""Growing the refiners of a trained transformer: the same function at first, then every new layer trains."""

from __future__ import annotations

import pytest
import torch

from experiments.grow_refiners import grow_refiners
from omnigen2 import OmniGen2Transformer2DModel


def _trained_tiny() -> OmniGen2Transformer2DModel:
    """The tiny preset with every weight perturbed, so that no block is the identity (as after training)."""
    torch.manual_seed(0)
    model = OmniGen2Transformer2DModel.from_preset("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(4, 8, 8, generator=g), torch.randn(4, 6, 10, generator=g)]
    text = torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    refs = [None, [torch.randn(4, 8, 8, generator=g)]]  # one sample with a reference image: all three refiners
    return latents, torch.tensor([0.3, 0.7]), text, mask, refs


def _run(model, inputs):
    latents, t, text, mask, refs = inputs
    return model(latents, t, text, None, mask, refs)


def test_grown_model_computes_the_same_and_keeps_its_weights():
    model = _trained_tiny()
    grown = grow_refiners(model, 3).eval()
    assert grown.config.num_refiner_layers == 3
    assert [len(grown.noise_refiner), len(grown.ref_image_refiner), len(grown.context_refiner)] == [3, 3, 3]
    inputs = _inputs()
    with torch.no_grad():
        for a, b in zip(_run(model, inputs), _run(grown, inputs), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    trained = model.state_dict()
    for name, value in grown.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name
    assert grow_refiners(model, 1) is model


def test_every_new_layer_leaves_the_identity_on_the_first_step():
    model = _trained_tiny()
    grown = grow_refiners(model, 2).train()
    out = _run(grown, _inputs())
    sum(o.square().sum() for o in out).backward()
    # The branch gates of the new layers: adaLN modulation for the noise and reference refiners, the zeroed output
    # norms for the context refiner; each must receive a gradient, or the layer would stay the identity.
    # The modulation's rows are (scale_msa, gate_msa, scale_mlp, gate_mlp), C each.
    c = grown.config.hidden_size
    gates = {"context_refiner attention": grown.context_refiner[1].norm2.weight.grad}
    gates["context_refiner feed-forward"] = grown.context_refiner[1].ffn_norm2.weight.grad
    for name in ("noise_refiner", "ref_image_refiner"):
        grad = getattr(grown, name)[1].norm1.linear.weight.grad
        gates[f"{name} attention"], gates[f"{name} feed-forward"] = grad[c : 2 * c], grad[3 * c :]
    for name, grad in gates.items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_refiners_cannot_shrink():
    model = grow_refiners(_trained_tiny(), 2)
    with pytest.raises(ValueError, match="cannot shrink the refiners: the model has 2 layers, asked 1"):
        grow_refiners(model, 1)
