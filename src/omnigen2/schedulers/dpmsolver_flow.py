"""Multistep DPM-Solver++ for OmniGen2's flow prediction.

OmniGen2 uses a modified diffusers ``DPMSolverMultistepScheduler``: the noise level is sigma = 1 - t (t from
the same shifted schedule as the Euler sampler), alpha = 1 - sigma, and the data prediction is
``x0 = x + sigma * v`` for the model's velocity v (data - noise). The first step (sigma = 1, alpha = 0) and
the last (sigma = 0) sit at lambda = -inf / +inf; the update formulas stay finite there, as in the original,
and we compute them with the same float32 tensor arithmetic so the outputs match it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .flow_match_euler import shifted_timesteps


class DPMSolverMultistepScheduler(SchedulerMixin, ConfigMixin):
    """DPM-Solver++ (orders 1-3, midpoint or heun) for flow prediction; the original runs order 2, midpoint."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "flow_prediction",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        dynamic_time_shift: bool = True,
        time_shift_factor: float | None = None,
    ):
        if algorithm_type != "dpmsolver++":
            raise NotImplementedError(f"algorithm_type {algorithm_type!r}: only 'dpmsolver++' is supported")
        if prediction_type != "flow_prediction":
            raise NotImplementedError(f"prediction_type {prediction_type!r}: only 'flow_prediction' is supported")
        if solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type {solver_type!r}: choose 'midpoint' or 'heun'")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._reset()

    def _reset(self):
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    def set_timesteps(
        self, num_inference_steps: int | None = None, device=None, timesteps=None, num_tokens: int | None = None
    ) -> None:
        if timesteps is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            t = shifted_timesteps(
                num_inference_steps, num_tokens, self.config.dynamic_time_shift, self.config.time_shift_factor
            )
            t = torch.from_numpy(t)
        else:
            t = torch.as_tensor(timesteps, dtype=torch.float32)
        self.timesteps = t.to(dtype=torch.float32, device=device)
        # Sigmas stay on the CPU: the update coefficients are scalars, computed without touching the device.
        self.sigmas = torch.cat([1 - t.float().cpu(), torch.zeros(1)])
        self.num_inference_steps = len(t)
        self._reset()

    def _lambda(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 - sigma
        return alpha, torch.log(alpha) - torch.log(sigma)  # log-SNR; -inf at sigma = 1, +inf at sigma = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        i, n = self._step_index, len(self.timesteps)
        lower_final = i == n - 1 and (
            self.config.euler_at_final
            or (self.config.lower_order_final and n < 15)
            or self.config.final_sigmas_type == "zero"
        )
        lower_second = i == n - 2 and self.config.lower_order_final and n < 15

        x0 = sample + self.sigmas[i] * model_output  # data prediction
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.float()
        order = self.config.solver_order
        if order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = self._first_order(x0, sample)
        elif order == 2 or self.lower_order_nums < 2 or lower_second:
            prev = self._second_order(sample)
        else:
            prev = self._third_order(sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _first_order(self, x0, sample):
        i = self._step_index
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        alpha_t, lam_t = self._lambda(sigma_t)
        _, lam_s = self._lambda(sigma_s)
        h = lam_t - lam_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _second_order(self, sample):
        i = self._step_index
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]
        alpha_t, lam_t = self._lambda(sigma_t)
        _, lam_s0 = self._lambda(sigma_s0)
        _, lam_s1 = self._lambda(sigma_s1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.config.solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        )

    def _third_order(self, sample):
        i = self._step_index
        sigma_t, s0, s1, s2 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]
        alpha_t, lam_t = self._lambda(sigma_t)
        lam_s0, lam_s1, lam_s2 = (self._lambda(s)[1] for s in (s0, s1, s2))
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return (
            (sigma_t / s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * m0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
        )
