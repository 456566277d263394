"""The colour-binding probe on the official-tiny checkpoint (random weights): what a causal language model can
and cannot carry, whatever it learned. The bundled model's figures are in docs/notes/transformer.md,
"The colours the conditioning hides", and docs/notes/image-failures.md, "Where text-to-image fails"."""

from __future__ import annotations

import pytest
import torch

from experiments.text_binding import READS, SEPARATION_TOKENS, binding_probe, colour_separation


def test_probe_reads_what_the_tokens_hold_and_not_the_future(tiny_pipe):
    out = binding_probe(tiny_pipe, n=400)
    assert set(out) == set(READS)
    # A colour word's own state holds that word (its embedding enters through the residual stream).
    assert out["colour 2 -> c2"] >= 0.9
    # The first shape word comes before the second colour: a causal model cannot know it (chance is 1/6 given
    # c1 != c2; 80 test prompts).
    assert out["shape 1 -> c2 (future: chance)"] <= 0.35


def test_needs_enough_prompts(tiny_pipe):
    with pytest.raises(ValueError, match="at least 50"):
        binding_probe(tiny_pipe, n=10)


def test_colour_separation(tiny_pipe):
    out = colour_separation(tiny_pipe)
    assert set(out) == set(SEPARATION_TOKENS)
    # The word before the colour has not seen it: a causal model gives the six prompts the same state there.
    assert out["before"]["mean"] <= 1e-6
    # The colour word's own state differs by its embedding; the matrix is a symmetric distance matrix.
    assert out["colour"]["min"] > 1e-3
    m = torch.tensor(out["colour"]["matrix"])
    assert torch.allclose(m, m.T) and m.diagonal().abs().max() == 0
