"""Flow-matching samplers: the time shift, exact integration of straight paths, DPM-Solver++ consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnigen2.schedulers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    make_scheduler,
    shifted_timesteps,
)


def test_time_shift_formula():
    t = shifted_timesteps(4, 1600, True)  # m = sqrt(1600) / 40 = 1: no shift
    np.testing.assert_array_equal(t, np.array([0, 0.25, 0.5, 0.75], dtype=np.float32))
    t = shifted_timesteps(4, 4096 * 4, True)  # m = 3.2 (1024x1024): times pulled towards noise
    base = np.array([0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(t, base / (3.2 - 3.2 * base + base), rtol=1e-6)
    assert (t[1:] < base[1:]).all()
    np.testing.assert_array_equal(shifted_timesteps(4, 4096 * 4, False), base.astype(np.float32))


def straight_path(sched, steps, num_tokens=256):
    """Sample the exact velocity field of x_t = t*x1 + (1-t)*x0 from x0; must land on x1."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sched.set_timesteps(steps, num_tokens=num_tokens)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(x1 - x0, t, x, return_dict=False)[0]
    return x, x1


@pytest.mark.parametrize("steps", [1, 3, 10, 20])
def test_euler_integrates_straight_paths(steps):
    x, x1 = straight_path(FlowMatchEulerDiscreteScheduler(dynamic_time_shift=True), steps)
    assert (x - x1).abs().max() < 1e-5


@pytest.mark.parametrize("steps", [2, 6, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmsolver_integrates_straight_paths(steps, solver_type, order):
    sched = DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type)
    x, x1 = straight_path(sched, steps)
    assert torch.isfinite(x).all()
    assert (x - x1).abs().max() < 1e-4


def test_dpmsolver_first_order_is_euler():
    """DPM-Solver++(1) on the flow path is algebraically the Euler step; check it on arbitrary outputs."""
    g = torch.Generator().manual_seed(3)
    a, b = DPMSolverMultistepScheduler(solver_order=1), FlowMatchEulerDiscreteScheduler(dynamic_time_shift=True)
    for s in (a, b):
        s.set_timesteps(7, num_tokens=1024)
    xa = xb = torch.randn(2, 4, 8, 8, generator=g)
    for t in a.timesteps:
        v = torch.randn(2, 4, 8, 8, generator=g)
        xa = a.step(v, t, xa, return_dict=False)[0]
        xb = b.step(v, t, xb, return_dict=False)[0]
        assert (xa - xb).abs().max() < 1e-5


def test_dpmsolver_second_order_differs_from_first():
    """With curved trajectories the second-order correction is active (not silently first order)."""
    g = torch.Generator().manual_seed(4)
    outs = []
    for order in (1, 2):
        s = DPMSolverMultistepScheduler(solver_order=order)
        s.set_timesteps(6, num_tokens=1024)
        x = torch.zeros(1, 4, 4, 4)
        gen = torch.Generator().manual_seed(5)
        for t in s.timesteps:
            x = s.step(torch.randn(1, 4, 4, 4, generator=gen), t, x, return_dict=False)[0]
        outs.append(x)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    del g


def test_custom_timesteps_and_validation():
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(timesteps=[0.0, 0.5, 0.9])
    assert s.timesteps.tolist() == pytest.approx([0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="increasing"):
        s.set_timesteps(timesteps=[0.5, 0.2])
    with pytest.raises(ValueError, match="positive"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("ddim")
    assert isinstance(make_scheduler("dpmsolver++"), DPMSolverMultistepScheduler)
    with pytest.raises(NotImplementedError):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")


def test_scheduler_config_round_trip(tmp_path):
    s = DPMSolverMultistepScheduler(solver_order=3, dynamic_time_shift=False)
    s.save_pretrained(tmp_path)
    t = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert t.config.solver_order == 3 and t.config.dynamic_time_shift is False
