"""Rectified-flow Euler sampler with OmniGen2's resolution-dependent time shift.

Time runs from t = 0 (pure noise) to t = 1 (data); the model predicts the velocity v = x1 - x0
(data minus noise), so one Euler step is ``x <- x + (t_next - t) * v``. This is the opposite direction of
diffusers' ``FlowMatchEulerDiscreteScheduler`` (which counts sigma down from 1), hence a class of our own
that keeps the released config's class name and fields.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


def warp(t, m):
    """The time shift of training and sampling: t' = t / (m - m t + t), towards noise (t = 0) for m > 1; for a
    float or an array (the same operations in the same order, so the sampler's float32 times stay exact)."""
    return t / (m - m * t + t)


def shifted_timesteps(
    num_inference_steps: int, num_tokens: int | None, dynamic_time_shift: bool, shift_factor: float | None = None
) -> np.ndarray:
    """``num_inference_steps`` times in [0, 1), warped towards 0 for large images.

    With m = sqrt(num_tokens) / 40 (1.0 at 320x320 with a 16x latent-token stride, 3.2 at 1024x1024),
    t' = t / (m - m t + t): more steps are spent near pure noise as the resolution grows. Computed in
    float32 numpy exactly as the original, since the timesteps enter the model.
    """
    t = np.linspace(0, 1, num_inference_steps + 1, dtype=np.float32)[:-1]
    if dynamic_time_shift and num_tokens is not None:
        t = warp(t, np.sqrt(num_tokens) / 40)
    elif shift_factor is not None:  # a fixed warp (not in the original): small models trained with it
        t = warp(t, np.float32(shift_factor))
    return t


class FlowMatchEulerDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for OmniGen2 (config: ``num_train_timesteps``, ``dynamic_time_shift``)."""

    order = 1

    @register_to_config
    def __init__(
        self, num_train_timesteps: int = 1000, dynamic_time_shift: bool = False, time_shift_factor: float | None = None
    ):
        self.timesteps = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        self._t_ext = torch.cat([self.timesteps, torch.ones(1)])
        self._step_index = 0
        self.num_inference_steps = None

    @property
    def step_index(self) -> int:
        return self._step_index

    def set_timesteps(
        self, num_inference_steps: int | None = None, device=None, timesteps=None, num_tokens: int | None = None
    ) -> None:
        """Set the sampling times; ``timesteps`` (floats in [0, 1)) overrides the shifted linear schedule."""
        if timesteps is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            t = shifted_timesteps(
                num_inference_steps, num_tokens, self.config.dynamic_time_shift, self.config.time_shift_factor
            )
        else:
            t = np.asarray(timesteps, dtype=np.float32)
            if t.ndim != 1 or len(t) == 0 or (t < 0).any() or (t >= 1).any() or (np.diff(t) <= 0).any():
                raise ValueError("timesteps must be a non-empty increasing list of floats in [0, 1)")
        self.timesteps = torch.from_numpy(t).to(dtype=torch.float32, device=device)
        self._t_ext = torch.cat([self.timesteps, torch.ones(1, device=self.timesteps.device)])  # ends at t = 1
        self.num_inference_steps = len(t)
        self._step_index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        """One Euler step in float32; ``timestep`` is implied by the internal step counter."""
        t, t_next = self._t_ext[self._step_index], self._t_ext[self._step_index + 1]
        prev = (sample.float() + (t_next - t) * model_output).to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
