"""The rectified-flow training objective of OmniGen2.

Path: x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) noise and x1 the data latents (t = 1 is clean, as at
inference); target velocity u = x1 - x0. Times are logit-normal (t = sigmoid(n), n ~ N(0, 1)) and then
shifted towards noise for large images:

- ``"v2"`` (default): t' = t / (m - m t + t), m = sqrt(tokens) / 20 with tokens = (h/2)(w/2) latent patches.
  Since sqrt(tokens)/20 = sqrt(h w)/40, this is exactly the inference schedule's shift.
- ``"v1"``: the SD3 / Flux shift in this time direction, mu linear in tokens from 0.5 at 256 to 1.15 at 4096,
  t' = 1 - e^mu / (e^mu + 1/(1 - t) - 1).
- ``"fixed"``: the same warp with a given m (``objective.shift_factor``), whatever the size. Small images need
  it: at 64 tokens the ``v2`` m is 0.4, which moves t to the clean end, while the prompt matters at the noisy
  end (the layout is decided there; at t > 0.2 the image already shows itself in x_t). The bundled Shapes model
  uses m = 3, close to the released model's 3.2 at 1024x1024, and samples with the same warp.
- ``"none"``: no shift.

All randomness comes from a per-sample generator, so a sample's noise and time depend on (seed, step,
position) only.
"""

from __future__ import annotations

import math

import torch

from ..schedulers.flow_match_euler import warp

SHIFTS = ("v2", "v1", "fixed", "none")
TIME_SAMPLERS = ("lognorm", "uniform")


def sample_time(gen: torch.Generator, sampler: str = "lognorm") -> float:
    if sampler == "lognorm":
        return torch.sigmoid(torch.randn((), generator=gen)).item()
    if sampler == "uniform":
        return torch.rand((), generator=gen).item()
    raise ValueError(f"unknown time sampler {sampler!r}; choose one of {', '.join(TIME_SAMPLERS)}")


def shift_time(t: float, tokens: int, shift: str = "v2", factor: float = 3.0) -> float:
    if shift in ("v2", "fixed"):
        return warp(t, math.sqrt(tokens) / 20 if shift == "v2" else factor)
    if shift == "v1":
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        s = 1 - t
        if s <= 0:
            return 1.0
        return 1 - math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    if shift == "none":
        return t
    raise ValueError(f"unknown time shift {shift!r}; choose one of {', '.join(SHIFTS)}")


def noisy_inputs(
    x1: list[torch.Tensor], gens: list[torch.Generator], patch_size: int, sampler: str, shift: str, factor: float = 3.0
):
    """For each clean latent (C, H, W): (x_t, t, target velocity)."""
    xt, ts, targets = [], [], []
    for x, g in zip(x1, gens):
        tokens = (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)
        t = shift_time(sample_time(g, sampler), tokens, shift, factor)
        x0 = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        xt.append(t * x + (1 - t) * x0)
        ts.append(t)
        targets.append(x - x0)
    return xt, torch.tensor(ts, device=x1[0].device, dtype=x1[0].dtype), targets


def flow_loss(pred: list[torch.Tensor], target: list[torch.Tensor], reduction: str = "element") -> torch.Tensor:
    """Mean squared error over variable-size samples.

    ``"element"``: every latent element of the batch weighs the same (sum of squared errors / element count).
    ``"sample"``: each sample's own mean, averaged over samples (the original; small images weigh as much as
    large ones).
    """
    sq = [(p.float() - t.float()).square() for p, t in zip(pred, target)]
    if reduction == "element":
        return sum(s.sum() for s in sq) / sum(t.numel() for t in target)
    if reduction == "sample":
        return torch.stack([s.mean() for s in sq]).mean()
    raise ValueError(f"unknown loss reduction {reduction!r}; choose 'element' or 'sample'")
