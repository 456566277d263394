"""``torch.compile`` around the transformer's blocks, applied from outside the model code.

Each block (the refiners and the joint blocks) is compiled on its own with ``nn.Module.compile``, as torchtitan
does: the blocks are where the time goes, one block's graph serves all the blocks of its kind, and the parameter
names stay those of the released layout (``torch.compile(model)`` would prefix them with ``_orig_mod.``), so
checkpoints, EMA and export need not know. The packing of sequences around the blocks stays eager, and so does
attention over several packed sequences (``models/attention.py``), whose per-sequence loop changes with every
batch; what the compiler sees is the norms, projections, RoPE, gates and the SwiGLU, whose elementwise work it
fuses.

``dynamic=True`` for training, where the token count changes with every batch (one graph for all of them);
``dynamic=False`` for a fixed inference shape.
"""

from __future__ import annotations

from torch import nn


def transformer_blocks(transformer) -> list[nn.Module]:
    """Every block of an OmniGen2 transformer, refiners first."""
    return [
        *transformer.noise_refiner,
        *transformer.ref_image_refiner,
        *transformer.context_refiner,
        *transformer.layers,
    ]


def compile_blocks(transformer, dynamic: bool | None = None, **kwargs) -> int:
    """Compile each block of ``transformer`` in place (``kwargs`` go to ``torch.compile``: ``mode``, ``backend``,
    ...). Returns how many blocks were compiled."""
    blocks = transformer_blocks(transformer)
    for blk in blocks:
        blk.compile(dynamic=dynamic, **kwargs)
    return len(blocks)
