"""Step caches: TeaCache and TaylorSeer semantics, and the cfg_range crash of the original fixed."""

from __future__ import annotations

import pytest
import torch

from omnigen2.acceleration import CacheConfig, NoCache, TaylorSeer, TeaCache


def run(cache, model, prepare, step, num_steps):
    cache.begin_step(step, num_steps)
    return cache.run(model, prepare, None, None)


class LinearModel:
    """Stands in for the transformer: the joint blocks output a * (call index) + b."""

    def __init__(self):
        self.calls = 0
        self.a, self.b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])

    def run_layers(self, hidden, temb, layout):
        out = self.a * self.calls + self.b
        return out


def test_taylorseer_extrapolates_linear_features_exactly():
    model, cache = LinearModel(), TaylorSeer()
    outs = []
    for step in range(12):
        model.calls = step
        outs.append(run(cache, model, lambda: None, step, 12))
    assert cache.computed_steps == [0, 1, 2, 3, 4, 7, 10]
    for step, out in enumerate(outs):
        assert torch.allclose(out, model.a * step + model.b, atol=1e-6), step


def test_taylorseer_skips_preparation_on_predicted_steps():
    model, cache = LinearModel(), TaylorSeer()
    prepared = []
    for step in range(9):
        run(cache, model, lambda s=step: prepared.append(s), step, 9)
    assert prepared == [0, 1, 2, 3, 4, 7]


class ResidualModel:
    """Joint blocks add a fixed residual; the first block's modulation is the identity."""

    class _Norm:
        def __call__(self, x, temb, owner=None):
            return x, None, None, None

    class _Layer:
        def __init__(self):
            self.norm1 = ResidualModel._Norm()

    def __init__(self):
        self.layers = [self._Layer()]
        self.runs = 0

    def run_layers(self, hidden, temb, layout):
        self.runs += 1
        return hidden + 1.0


def test_teacache_threshold_zero_always_computes():
    model, cache = ResidualModel(), TeaCache(0.0)
    for step in range(5):
        run(cache, model, lambda s=step: torch.full((1, 2, 3), float(s + 1)), step, 5)
    assert model.runs == 5


def test_teacache_reuses_residual_when_input_barely_changes():
    model, cache = ResidualModel(), TeaCache(10.0)
    outs = [run(cache, model, lambda s=s: torch.full((1, 2, 3), 2.0 + 1e-3 * s), s, 6) for s in range(6)]
    assert cache.computed_steps == [0, 5]  # first and last step always computed
    assert torch.allclose(outs[2], torch.full((1, 2, 3), 3.0 + 2e-3))  # input + cached residual


def test_teacache_first_call_after_step_zero_computes():
    """The original crashes when a guidance branch first runs at step > 0 (cfg_range starting late)."""
    model, cache = ResidualModel(), TeaCache(10.0)
    out = run(cache, model, lambda: torch.ones(1, 2, 3), 3, 10)
    assert cache.computed_steps == [3] and torch.allclose(out, torch.full((1, 2, 3), 2.0))


def test_cache_config():
    assert isinstance(CacheConfig().make(), NoCache)
    assert isinstance(CacheConfig(teacache=0.1).make(), TeaCache)
    assert isinstance(CacheConfig(taylorseer=True).make(), TaylorSeer)
    with pytest.raises(ValueError, match="alternatives"):
        CacheConfig(teacache=0.1, taylorseer=True)
    with pytest.raises(ValueError, match=">= 0"):
        TeaCache(-1.0)


def test_teacache_with_late_cfg_range_runs_through_pipeline(tiny_pipe):
    out = tiny_pipe(
        prompt="A red circle.",
        height=64,
        width=64,
        num_inference_steps=6,
        cfg_range=(0.3, 1.0),
        teacache=0.2,
        latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        output_type="pt",
    )
    assert torch.isfinite(out.images).all()
    assert out.computed_steps["uncond"][0] == 2  # the unconditional branch starts at step 2 and computes there
