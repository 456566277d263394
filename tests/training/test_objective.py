"""The flow-matching objective: time sampling and shifts, noisy inputs, loss reductions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnigen2.schedulers import shifted_timesteps
from omnigen2.training.objective import flow_loss, noisy_inputs, sample_time, shift_time


def test_v2_shift_is_the_inference_shift():
    """Training tokens are 2x2 latent patches, inference counts latent pixels: the same m."""
    h, w = 64, 96  # latent size
    infer = shifted_timesteps(10, h * w, True)
    base = np.linspace(0, 1, 11, dtype=np.float32)[:-1]
    train = [shift_time(float(t), (h // 2) * (w // 2), "v2") for t in base]
    np.testing.assert_allclose(train, infer, rtol=1e-5, atol=1e-6)


def test_v1_shift():
    assert shift_time(0.5, 256, "v1") == pytest.approx(1 - math.exp(0.5) / (math.exp(0.5) + 1))
    assert shift_time(0.0, 4096, "v1") == pytest.approx(0.0)
    assert shift_time(1.0, 4096, "v1") == 1.0
    assert shift_time(0.3, 4096, "none") == 0.3
    with pytest.raises(ValueError, match="unknown time shift"):
        shift_time(0.3, 1, "v3")


def test_lognormal_times():
    g = torch.Generator().manual_seed(0)
    ts = np.array([sample_time(g, "lognorm") for _ in range(4000)])
    logits = np.log(ts / (1 - ts))
    assert abs(logits.mean()) < 0.06 and abs(logits.std() - 1) < 0.05


def test_noisy_inputs_follow_the_path():
    x1 = [torch.randn(4, 8, 8), torch.randn(4, 6, 10)]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    xt, t, target = noisy_inputs(x1, gens, 2, "uniform", "none")
    for i in range(2):
        x0 = x1[i] - target[i]
        assert torch.allclose(xt[i], t[i] * x1[i] + (1 - t[i]) * x0, atol=1e-6)
        assert abs(float(x0.std()) - 1) < 0.3


def test_loss_reductions():
    pred = [torch.zeros(1, 2, 2), torch.zeros(1, 4, 4)]
    target = [torch.ones(1, 2, 2), torch.full((1, 4, 4), 2.0)]
    assert flow_loss(pred, target, "element").item() == pytest.approx((4 * 1 + 16 * 4) / 20)
    assert flow_loss(pred, target, "sample").item() == pytest.approx((1 + 4) / 2)
