"""The partial-denoising diagnostic on the bundled Shapes model: its two ends are checked against what they must
be (the figures in between are in docs/notes/image-failures.md, "Where text-to-image fails")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.partial_denoise import main, partial_denoise, partial_generate
from omnigen2 import OmniGen2Pipeline
from omnigen2.eval import shapesbench as sb


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = OmniGen2Pipeline.from_pretrained("builtin:shapes")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_from_pure_noise_it_is_plain_generation(shapes_pipe):
    """t0 = 0 starts from the noise the pipeline would draw, with the pipeline's own schedule: the same image."""
    case_list = sb.benchmark_cases(["t2i", "edit"], 2)
    gen = partial_generate(shapes_pipe, case_list, 0.0)
    plain = sb.pipeline_generate(shapes_pipe)
    for c in case_list:
        inputs = c.input_images()
        a = gen(c.prompt, inputs, torch.Generator().manual_seed(3))
        b = plain(c.prompt, inputs, torch.Generator().manual_seed(3))
        assert np.array_equal(np.asarray(a), np.asarray(b)), c.name


def test_near_the_clean_end_the_target_comes_back(shapes_pipe):
    """At t0 = 0.99 the start is the target with 1% noise: every case must pass, whatever the model learned."""
    reports = partial_denoise(shapes_pipe, n=6, tasks=("t2i", "ic"), t0s=(0.99,))
    rep = reports[0.99]
    assert rep.task_score("t2i") == 1.0 and rep.task_score("ic") == 1.0


def test_bad_start_time_and_tasks(shapes_pipe, capsys):
    with pytest.raises(ValueError, match="t0 must be in"):
        partial_generate(shapes_pipe, sb.benchmark_cases(["t2i"], 1), 1.0)
    with pytest.raises(SystemExit):
        main(["builtin:shapes", "--tasks", "understanding"])
    assert "not image tasks" in capsys.readouterr().err
