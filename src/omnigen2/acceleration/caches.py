"""Step caches for the joint transformer blocks, applied from outside the model.

The transformer's forward takes ``step_cache=``: it then calls ``cache.run(model, prepare, temb, layout)``
instead of running the joint blocks itself. ``prepare()`` computes the joint input (stages 1-3); a cache may
skip it together with the blocks. One cache object holds the state of one guidance branch for one
generation (the original keeps one state per branch); the sampler tells it the step with ``begin_step``.
Every cache also keeps the branch's refined text (the context refiner has no timestep input).

A cache decides in two phases, so that several branches can share one packed transformer call
(:class:`BranchCaches`): ``decide(modulated)`` says whether the joint blocks run this step (``modulated``:
the first block's modulated input, given only to caches with ``wants_input``), and ``finish(hidden, out)``
turns the blocks' output (``None`` when skipped) into the branch's joint output and updates the state.

- :class:`NoCache` always computes.
- :class:`TeaCache` (Liu et al. 2024) skips the joint blocks while the accumulated, polynomially rescaled
  relative L1 change of the first block's modulated input stays below ``rel_l1_thresh``, re-using the last
  residual (output - input) of the blocks.
- :class:`TaylorSeer` (Liu et al. 2025) computes fully on a fixed pattern of steps and predicts the others
  with a Taylor expansion in the step index of the cached features.
"""

from __future__ import annotations

import itertools
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

    wants_input = False  # whether decide() needs the first block's modulated input

    def decide(self, modulated: torch.Tensor | None) -> bool:
        return True

    def finish(self, hidden: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        """``hidden``: the joint input at the rows the blocks return (when the input was prepared)."""
        self.computed_steps.append(self.step)
        return out

    def run(self, model, prepare: Callable, temb, layout) -> torch.Tensor:
        """One branch: decide, run the joint blocks if asked, finish."""
        hidden = prepare() if self.wants_input else None
        modulated = first_block_input(model, hidden, temb, layout) if self.wants_input else None
        out = None
        if self.decide(modulated):
            hidden = prepare() if hidden is None else hidden
            out = model.run_layers(hidden, temb, layout)
        return self.finish(None if hidden is None else output_rows(hidden, layout), out)


def output_rows(hidden: torch.Tensor, layout) -> torch.Tensor:
    """The rows of the joint stream that the joint blocks return (the target tokens)."""
    return hidden if layout is None else hidden[layout.out_index]


def first_block_input(model, hidden: torch.Tensor, temb, layout) -> torch.Tensor:
    """What the first joint block sees: its modulated norm of the joint input, (T, C)."""
    owner = layout.joint.segs.owner if layout is not None else None
    return model.layers[0].norm1(hidden, temb, owner)[0]


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

    wants_input = True

    def decide(self, modulated):
        step, num_steps = self.step, self.num_steps
        if step in (0, num_steps - 1) or self.previous_modulated is None:
            compute, self.accumulated = True, 0.0
        else:
            prev = self.previous_modulated
            # The skip decision is made on the host, so this .item() is the one device sync of the cache.
            # Means over the real tokens: the original's zero padding adds nothing to either sum.
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += float(self.rescale(rel))
            compute = self.accumulated >= self.thresh
            if compute:
                self.accumulated = 0.0
        self.previous_modulated = modulated
        return compute

    def finish(self, hidden, out):
        if out is None:
            return hidden + self.previous_residual
        self.previous_residual = out - hidden
        self.computed_steps.append(self.step)
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

    def decide(self, modulated):
        return self._full()

    def finish(self, hidden, out):
        if out is None:
            out = self._predict()
        else:
            self._update(out)
            self.computed_steps.append(self.step)
        self.calls += 1
        return out


class BranchCaches:
    """The caches of several guidance branches evaluated in one packed transformer call.

    The packed batch holds the branches' samples in order (``samples[b]`` samples for branch b). Each branch
    keeps its own state and decisions, as if it ran alone: when every branch computes, the joint blocks run
    once over the packed stream; when only some do (TeaCache), those run alone with their own ``layouts[b]``;
    the refined text is stored per branch.
    """

    reuse_context = True

    def __init__(self, caches: list, samples: list[int], layouts: list):
        self.caches, self.samples, self.layouts = list(caches), list(samples), list(layouts)
        self._layout = None

    def begin_step(self, step: int, num_steps: int) -> None:
        for c in self.caches:
            c.begin_step(step, num_steps)

    def _spans(self, lens: list[int]) -> list[tuple[int, int]]:
        """Token range of each branch in a stream with per-sample lengths ``lens``."""
        bounds = [0, *itertools.accumulate(self.samples)]
        starts = [0, *itertools.accumulate(lens)]
        return [(starts[a], starts[b]) for a, b in itertools.pairwise(bounds)]

    @property
    def context(self):
        parts = [c.context for c in self.caches]
        return None if any(p is None for p in parts) else torch.cat(parts)

    @context.setter
    def context(self, value):
        for c, (a, b) in zip(self.caches, self._spans(self._layout.cap_lens)):
            c.context = value[a:b]

    def run(self, model, prepare, temb, layout):
        self._layout = layout
        spans, out_spans = self._spans(layout.seq_lens), self._spans(layout.img_lens)
        wants = any(c.wants_input for c in self.caches)
        hidden = prepare() if wants else None
        modulated = first_block_input(model, hidden, temb, layout) if wants else None
        flags = [c.decide(None if modulated is None else modulated[a:b]) for c, (a, b) in zip(self.caches, spans)]
        outs = [None] * len(self.caches)
        if any(flags):
            hidden = prepare() if hidden is None else hidden
            if all(flags):
                out = model.run_layers(hidden, temb, layout)  # (T_out, C)
                outs = [out[a:b] for a, b in out_spans]
            else:
                if temb.shape[0] != 1:
                    raise ValueError("branches that compute apart must share one timestep")
                outs = [
                    model.run_layers(hidden[a:b], temb, lay) if f else None
                    for f, (a, b), lay in zip(flags, spans, self.layouts)
                ]
        rows = None if hidden is None else output_rows(hidden, layout)
        parts = [c.finish(None if rows is None else rows[a:b], o) for c, (a, b), o in zip(self.caches, out_spans, outs)]
        return torch.cat(parts)


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
