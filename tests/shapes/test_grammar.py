"""The grammar recogniser: every generated prompt parses to its task; other text does not."""

from __future__ import annotations

import pytest

from omnigen2.shapes.grammar import in_grammar, parse
from omnigen2.shapes.tasks import TASKS, cases


@pytest.mark.parametrize("task", list(TASKS))
def test_generated_prompts_parse_to_their_task(task):
    for case in cases(task, 60, split="eval"):
        got = parse(case.prompt)
        assert got is not None and got[0] == task, (case.prompt, got)
        if task in ("t2i", "edit", "ic") and case.category not in ("colors",):
            assert got[1] == case.category, (case.prompt, got)


def test_examples():
    assert parse("A red circle with a yellow dot at the top left on a sky background.") == ("t2i", "single")
    assert parse("two blue crosss") == ("t2i", "counting")  # the contract's literal plural
    assert parse("three green crosses") == ("t2i", "counting")
    assert parse("make the red circle blue") == ("edit", "recolor")
    assert parse("how many squares are there?") == ("understanding", "count")
    for text in ("a cat", "draw me a dog", "a red circle left of", "five red circles", "make the sky blue"):
        assert not in_grammar(text), text


def test_bundled_domain_warns_outside_the_grammar(tiny_pipe):
    import torch

    tiny_pipe._model_index_extra["omnigen2_domain"] = "shapes"
    try:
        kw = dict(height=64, width=64, num_inference_steps=1, output_type="latent", latents=torch.zeros(1, 4, 16, 16))
        with pytest.warns(UserWarning, match="only knows the Shapes World"):
            tiny_pipe(prompt="a photo of a cat", **kw)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tiny_pipe(prompt="a red circle at the top left", **kw)
    finally:
        del tiny_pipe._model_index_extra["omnigen2_domain"]
