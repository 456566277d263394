from .dpmsolver_flow import DPMSolverMultistepScheduler
from .flow_match_euler import FlowMatchEulerDiscreteScheduler, shifted_timesteps

SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, dynamic_time_shift: bool = True, time_shift_factor: float | None = None):
    """A sampler by name: 'euler' (the released default) or 'dpmsolver++' (order 2, midpoint, as the original)."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(
            dynamic_time_shift=dynamic_time_shift, time_shift_factor=time_shift_factor
        )
    if name in ("dpmsolver++", "dpmsolver"):
        return DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            solver_order=2,
            prediction_type="flow_prediction",
            dynamic_time_shift=dynamic_time_shift,
            time_shift_factor=time_shift_factor,
        )
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


__all__ = [
    "SCHEDULERS",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "make_scheduler",
    "shifted_timesteps",
]
