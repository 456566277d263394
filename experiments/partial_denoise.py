"""Where along the sampling trajectory a model loses a case: ShapesBench cases started from the right answer
noised to time t0 and finished by the model, with its own schedule from t0 on.

x_t0 = t0 x1 + (1 - t0) x0 with x1 the VAE latents of the case's canonical target (t = 0 is pure noise); the
pipeline then runs the sampling times above t0 (t0 first). At t0 near 1 only the last steps are the model's, so
the score tells whether it finishes an image cleanly; as t0 falls, more of the layout, colours and shapes are
left to the model, and at t0 = 0 it is plain ShapesBench. The t0 where the score collapses is where training has
to improve (docs/notes/image-failures.md, "Where text-to-image fails")::

    python experiments/partial_denoise.py [MODEL] [--n 120] [--tasks t2i] [--t0 0.85 0.5 0.2]
"""

from __future__ import annotations

import argparse
import json

import torch

from omnigen2.eval import shapesbench as sb

T0S = (0.85, 0.5, 0.2)


def partial_generate(pipe, case_list, t0: float, steps: int | None = None, **kwargs) -> sb.Generate:
    """A ShapesBench generator that starts each of ``case_list``'s cases from its target noised to ``t0``."""
    if not 0.0 <= t0 < 1.0:
        raise ValueError(f"t0 must be in [0, 1), got {t0}")
    table = {sb._key(c.prompt, c.input_images()): c for c in case_list}
    steps = steps or pipe.sampling_defaults.get("num_inference_steps", 28)
    size = sb.CANVAS
    # The model's own times (its scheduler, its shift) for this canvas, from t0 on.
    side = size // pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(steps, num_tokens=side * side)
    times = [t0] + [float(t) for t in pipe.scheduler.timesteps.cpu() if t > t0 + 1e-6]

    def generate(prompt, input_images, generator):
        case = table[sb._key(prompt, input_images)]
        x1 = pipe.encode_images([case.render_target()], size * size, size)[0][None]  # (1, C, h, w)
        x0 = torch.randn(x1.shape, generator=generator).to(x1)
        out = pipe(
            prompt=prompt,
            input_images=input_images or None,
            height=size,
            width=size,
            latents=t0 * x1 + (1 - t0) * x0,
            timesteps=times,
            generator=generator,
            output_type="pil",
            **kwargs,
        )
        return out.images[0]

    return generate


def partial_denoise(pipe, n: int = 120, tasks=("t2i",), t0s=T0S, progress: bool = False) -> dict[float, sb.Report]:
    """t0 -> the ShapesBench report of ``n`` held-out cases per task started from their targets noised to t0."""
    case_list = sb.benchmark_cases(tasks, n)
    return {
        t0: sb.run(partial_generate(pipe, case_list, t0), n, tasks, progress=progress, case_list=case_list)
        for t0 in t0s
    }


def main(argv=None) -> int:
    from omnigen2.pipelines import OmniGen2Pipeline

    p = argparse.ArgumentParser(prog="python experiments/partial_denoise.py", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="builtin:shapes", help="pipeline directory or builtin:NAME")
    p.add_argument("--n", type=int, default=120, help="held-out cases per task")
    p.add_argument("--tasks", default="t2i", help="comma-separated image tasks: t2i, edit, ic")
    p.add_argument("--t0", type=float, nargs="+", default=list(T0S), help="start times (0 is pure noise)")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in sb.IMAGE_TASKS]
    if bad:
        p.error(f"--tasks: {bad} are not image tasks; choose from {', '.join(sb.IMAGE_TASKS)}")
    pipe = OmniGen2Pipeline.from_pretrained(args.model)
    reports = partial_denoise(pipe, args.n, tasks, args.t0, progress=True)
    summary = {}
    for t0, rep in reports.items():
        cats = {f"{task}/{c}": round(p_ / k, 3) for task in tasks for c, (p_, k) in rep.categories(task).items()}
        summary[t0] = {task: round(rep.task_score(task), 3) for task in tasks} | cats
        print(f"t0 = {t0:<5} " + "  ".join(f"{k} {v:.3f}" for k, v in summary[t0].items()))
    print(json.dumps({str(k): v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
