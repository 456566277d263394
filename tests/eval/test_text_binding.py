"""The colour-binding probe on the official-tiny checkpoint (random weights): what a causal language model can
and cannot carry, whatever it learned. The bundled model's figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest

from omnigen2.eval.text_binding import READS, binding_probe


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
