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
gradient is proportional to the other), which is why the modulated layers keep their norms at one. A grown
pipeline, to train on with ``omnigen2 train`` (``model.pretrained: OUT``)::

    python experiments/grow_refiners.py builtin:shapes runs/grown --layers 2
"""

from __future__ import annotations

import argparse

import torch

from omnigen2.models.transformer_omnigen2 import OmniGen2Transformer2DModel


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


def main(argv=None) -> int:
    from omnigen2.pipelines import OmniGen2Pipeline

    p = argparse.ArgumentParser(prog="python experiments/grow_refiners.py", description=__doc__.split("\n")[0])
    p.add_argument("model", help="pipeline directory or builtin:NAME")
    p.add_argument("out", help="where the grown pipeline is written")
    p.add_argument("--layers", type=int, required=True, help="refiner layers of the grown transformer")
    args = p.parse_args(argv)
    pipe = OmniGen2Pipeline.from_pretrained(args.model)
    pipe.transformer = grow_refiners(pipe.transformer, args.layers)
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(args.out)
    params = sum(x.numel() for x in pipe.transformer.parameters())
    print(f"{args.out}: {args.layers} refiner layers, {params:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
