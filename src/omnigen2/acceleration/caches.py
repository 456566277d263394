"""Step caches for the joint transformer blocks, applied from outside the model.

The transformer's forward takes ``step_cache=``: it then calls ``cache.run(model, prepare, temb, layout)``
instead of running the joint blocks itself. ``prepare()`` computes the joint input (stages 1-3); a cache may
skip it together with the blocks. One cache object holds the state of one guidance branch for one
generation (the original keeps one state per branch); the sampler tells it the step with ``begin_step``.
Every cache also keeps the branch's refined text (the context refiner has no timestep input).

- :class:`NoCache` always computes.
- :class:`TeaCache` (Liu et al. 2024) skips the joint blocks while the accumulated, polynomially rescaled
  relative L1 change of the first block's modulated input stays below ``rel_l1_thresh``, re-using the last
  residual (output - input) of the blocks.
- :class:`TaylorSeer` (Liu et al. 2025) computes fully on a fixed pattern of steps and predicts the others
  with a Taylor expansion in the step index of the cached features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# The original's fitted rescaling of the relative L1 distance (its numpy.poly1d, highest power first).
TEACACHE_COEFFICIENTS = (-5.48259225, 11.48772289, -4.47407401, 2.47730926, -0.03316487)


class NoCache:
    """Computes every step; still keeps the branch's refined text."""

    reuse_context = True

    def __init__(self):
        self.computed_steps: list[int] = []
        self.context: torch.Tensor | None = None
        self.step, self.num_steps = 0, 1

    def begin_step(self, step: int, num_steps: int) -> None:
        self.step, self.num_steps = step, num_steps

    def run(self, model, prepare: Callable, temb, layout) -> torch.Tensor:
        self.computed_steps.append(self.step)
        return model.run_layers(prepare(), temb, layout)


class TeaCache(NoCache):
    """TeaCache with the original's semantics; one instance per guidance branch.

    Deviation (fix): the original reads the previous modulated input on a branch's first call even when that
    call is not step 0 (a ``cfg_range`` starting after 0 runs the guidance branches first at a later step),
    and crashes. Here a branch's first call always computes.
    """

    def __init__(self, rel_l1_thresh: float):
        if rel_l1_thresh < 0:
            raise ValueError(f"TeaCache rel_l1_thresh must be >= 0, got {rel_l1_thresh}")
        super().__init__()
        self.thresh = rel_l1_thresh
        self.rescale = np.poly1d(TEACACHE_COEFFICIENTS)
        self.accumulated = 0.0
        self.previous_modulated = None
        self.previous_residual = None

    def run(self, model, prepare, temb, layout):
        step, num_steps = self.step, self.num_steps
        hidden = prepare()
        modulated = model.layers[0].norm1(hidden, temb)[0]  # (B, S, C): what the first block sees
        if step in (0, num_steps - 1) or self.previous_modulated is None:
            compute, self.accumulated = True, 0.0
        else:
            prev = self.previous_modulated
            # The skip decision is made on the host, so this .item() is the one device sync of the cache.
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += float(self.rescale(rel))
            compute = self.accumulated >= self.thresh
            if compute:
                self.accumulated = 0.0
        self.previous_modulated = modulated
        if not compute:
            return hidden + self.previous_residual
        out = model.run_layers(hidden, temb, layout)
        self.previous_residual = out - hidden
        self.computed_steps.append(step)
        return out


class TaylorSeer(NoCache):
    """TaylorSeer with the original's defaults and semantics; one instance per guidance branch.

    The original caches, for every joint block, Taylor factors of the block's output and, on a predicted step,
    replaces each block's output by its expansion, ignoring the block's input. The model output therefore
    depends only on the last block's expansion: that is all we keep (``max_order + 1`` tensors per branch
    instead of ``num_layers`` times that), and on predicted steps we skip the refiners and all blocks.

    Schedule (the original's ``cal_type``): calls 0..first_enhance-1 compute; after that every
    ``fresh_threshold``-th call computes. Finite differences over the computed steps build the factors once
    the call index exceeds ``first_enhance - 2``.
    """

    def __init__(self, first_enhance: int = 5, fresh_threshold: int = 3, max_order: int = 4):
        super().__init__()
        self.first_enhance, self.fresh_threshold, self.max_order = first_enhance, fresh_threshold, max_order
        self.calls = 0  # this branch's forward count: the original's current['step']
        self.counter = 0
        self.activated = [0]
        self.factors: dict[int, torch.Tensor] = {}

    def _full(self) -> bool:
        first = self.calls < self.first_enhance
        if first or self.counter == self.fresh_threshold - 1:
            self.counter = 0
            self.activated.append(self.calls)
            return True
        self.counter += 1
        return False

    def _update(self, feature: torch.Tensor) -> None:
        distance = self.activated[-1] - self.activated[-2]
        new = {0: feature}
        for i in range(self.max_order):
            if i in self.factors and self.calls > self.first_enhance - 2:
                new[i + 1] = (new[i] - self.factors[i]) / distance
            else:
                break
        self.factors = new

    def _predict(self) -> torch.Tensor:
        x = self.calls - self.activated[-1]
        out = 0
        for i in range(len(self.factors)):
            out = out + (1 / math.factorial(i)) * self.factors[i] * (x**i)
        return out

    def run(self, model, prepare, temb, layout):
        if self._full():
            out = model.run_layers(prepare(), temb, layout)
            self._update(out)
            self.computed_steps.append(self.step)
        else:
            out = self._predict()
        self.calls += 1
        return out


@dataclass
class CacheConfig:
    """Which step cache a generation uses: ``teacache`` is a threshold (None = off)."""

    teacache: float | None = None
    taylorseer: bool = False

    def __post_init__(self):
        if self.teacache is not None and self.taylorseer:
            raise ValueError("TeaCache and TaylorSeer are alternatives; enable one of them")

    def make(self):
        if self.taylorseer:
            return TaylorSeer()
        if self.teacache is not None:
            return TeaCache(self.teacache)
        return NoCache()
