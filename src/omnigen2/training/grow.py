"""Growing a trained transformer without changing what it computes.

``grow_refiners`` appends refiner layers (noise, reference-image and context refiner alike, as the released
model's ``num_refiner_layers`` sets all three) to a trained :class:`OmniGen2Transformer2DModel`. Every new layer
starts as the identity, so the grown model draws exactly what the trained one drew and training continues from
there instead of from a perturbed function:

- the noise and reference-image refiner layers are adaLN-zero blocks: their fresh initialisation already zeroes
  the modulation that gates both residual branches;
- the context-refiner layer has no modulation (unit gates), so its two output norms (``norm2`` after attention,
  ``ffn_norm2`` after the feed-forward) start at zero; their gradients are not zero (the branch outputs are not),
  so the layer leaves the identity on the first step.

Zeroing both the gate and the output norm of one branch would leave it at the identity for ever (each one's
gradient is proportional to the other), which is why the modulated layers keep their norms at one.
"""

from __future__ import annotations

import torch

from ..models.transformer_omnigen2 import OmniGen2Transformer2DModel


def grow_refiners(model: OmniGen2Transformer2DModel, layers: int, seed: int = 0) -> OmniGen2Transformer2DModel:
    """A copy of ``model`` with ``layers`` refiner layers (>= its own); the new ones (appended after the trained
    ones, initialised from ``seed``) start as the identity. Returns ``model`` itself when nothing is added."""
    have = model.config.num_refiner_layers
    if layers < have:
        raise ValueError(f"grow_refiners cannot shrink the refiners: the model has {have} layers, asked {layers}")
    if layers == have:
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = OmniGen2Transformer2DModel.from_config(model.config, num_refiner_layers=layers)
    result = grown.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:  # the trained weights must all find their place
        raise ValueError(f"weights with no place in the grown model: {result.unexpected_keys[:5]}")
    with torch.no_grad():
        for blk in grown.context_refiner[have:]:
            blk.norm2.weight.zero_()
            blk.ffn_norm2.weight.zero_()
        for blk in [*grown.noise_refiner[have:], *grown.ref_image_refiner[have:]]:
            blk.norm1.linear.weight.zero_()  # adaLN-zero, as initialize_weights leaves it: said, not assumed
            blk.norm1.linear.bias.zero_()
    return grown.to(dtype=next(model.parameters()).dtype)
