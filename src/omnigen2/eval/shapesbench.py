"""ShapesBench: score a generator on held-out Shapes World cases with the judge (docs/SHAPES.md).

A generator is any callable ``(prompt, input_images, generator) -> PIL image`` — :func:`pipeline_generate`
wraps an :class:`OmniGen2Pipeline`, :func:`oracle` renders the right answers. :func:`run` draws ``n`` cases
per task from evaluation seeds (spread evenly over the task's categories), generates, judges, and returns a
:class:`Report`: each category's pass rate with its case count, each task's mean over its categories, the
overall mean over tasks, and the rates of the judge's partial checks (subject consistency for in-context;
change made / rest kept for edits). :func:`score_text` does the same for understanding and reflection with an
``(image, question) -> answer`` function.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
from tqdm.auto import tqdm

from ..shapes import judge
from ..shapes.tasks import IMAGE_TASKS, TASKS, TEXT_TASKS, Case, answer, cases, stable_hash
from ..shapes.world import CANVAS

Generate = Callable[[str, list[PIL.Image.Image], torch.Generator | None], PIL.Image.Image]
Answer = Callable[[PIL.Image.Image, str], str]
PARTIAL_CHECKS = ("subject_consistency", "arrangement", "change_made", "rest_kept", "exact", "fix_repairs")


@dataclass
class CaseResult:
    task: str
    category: str
    seed: int
    prompt: str
    passed: bool
    reason: str
    details: dict


@dataclass
class Report:
    results: list[CaseResult]
    config: dict = field(default_factory=dict)

    def categories(self, task: str) -> dict[str, tuple[int, int]]:
        """category -> (passed, cases), in the task's category order; categories without cases left out."""
        out = {}
        for cat in TASKS[task]:
            rs = [r for r in self.results if r.task == task and r.category == cat]
            if rs:
                out[cat] = (sum(r.passed for r in rs), len(rs))
        return out

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if any(r.task == t for r in self.results)]

    def task_score(self, task: str) -> float:
        """The mean of the task's category pass rates (not the pooled pass rate)."""
        cats = self.categories(task).values()
        return sum(p / n for p, n in cats) / len(cats)

    @property
    def overall(self) -> float:
        return sum(map(self.task_score, self.tasks)) / len(self.tasks) if self.tasks else 0.0

    def partial(self, task: str) -> dict[str, dict]:
        """Rates of the judge's partial checks (e.g. subject consistency), over the cases that report them."""
        out = {}
        for key in PARTIAL_CHECKS:
            vals = [r.details[key] for r in self.results if r.task == task and r.details.get(key) is not None]
            if vals:
                out[key] = {"score": sum(vals) / len(vals), "n": len(vals)}
        return out

    def summary(self) -> dict:
        tasks = {}
        for t in self.tasks:
            cats = {c: {"score": p / n, "passed": p, "n": n} for c, (p, n) in self.categories(t).items()}
            n = sum(c["n"] for c in cats.values())
            tasks[t] = {"score": self.task_score(t), "n": n, "categories": cats, "partial": self.partial(t)}
        return {"overall": self.overall, "tasks": tasks}

    def table(self) -> str:
        lines = [f"{'task':<14}{'category':<24}{'score':>7}{'cases':>7}"]
        for t, s in self.summary()["tasks"].items():
            for c, v in s["categories"].items():
                lines.append(f"{t:<14}{c:<24}{v['score']:>7.3f}{v['n']:>7d}")
            for key, v in s["partial"].items():
                lines.append(f"{t:<14}{'(' + key.replace('_', ' ') + ')':<24}{v['score']:>7.3f}{v['n']:>7d}")
            lines.append(f"{t:<14}{'= mean':<24}{s['score']:>7.3f}{s['n']:>7d}")
        lines.append(f"{'overall':<38}{self.overall:>7.3f}{len(self.results):>7d}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path, samples: list[tuple[list[PIL.Image.Image], object]] | None = None) -> Path:
        """Write ``report.json`` (summary, config, every case) and, given samples, ``samples.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = {"summary": self.summary(), "config": self.config, "cases": [asdict(r) for r in self.results]}
        path = out / "report.json"
        path.write_text(json.dumps(data, indent=1))
        if samples:
            grid(self.results, samples).save(out / "samples.png")
        return path


# -- generators --------------------------------------------------------------------------------------------------


def pipeline_generate(pipe, steps: int | None = None, height: int = CANVAS, width: int = CANVAS, **kwargs) -> Generate:
    """An OmniGen2Pipeline as a generator; ``kwargs`` go to every pipeline call (guidance scales, ...)."""

    def generate(prompt: str, input_images: list[PIL.Image.Image], generator: torch.Generator | None):
        out = pipe(
            prompt=prompt,
            input_images=input_images or None,
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=generator,
            output_type="pil",
            **kwargs,
        )
        return out.images[0]

    return generate


def _key(prompt: str, images: Sequence[PIL.Image.Image]) -> tuple:
    return prompt, tuple(im.tobytes() for im in images)


def oracle(case_list: Sequence[Case]) -> Generate:
    """A generator that renders each case's canonical target, found by prompt and input pixels: it scores 1.0
    when the judge is right, so it checks the judge and the runner."""
    table = {_key(c.prompt, c.input_images()): c for c in case_list}

    def generate(prompt: str, input_images: list[PIL.Image.Image], generator=None):
        case = table.get(_key(prompt, input_images))
        if case is None:
            raise KeyError(f"the oracle knows no case with prompt {prompt!r} and these input images")
        return case.render_target()

    return generate


def oracle_answer(image: PIL.Image.Image, question: str) -> str:
    """Understanding answers computed from the judge's reading of the image (no reflection)."""
    scene = judge.read(image)
    return answer(question, scene) if not isinstance(scene, judge.Failure) else ""


# -- running -----------------------------------------------------------------------------------------------------


def benchmark_cases(tasks: Sequence[str], n: int) -> list[Case]:
    """ShapesBench: n held-out cases per task (evaluation seeds only), spread evenly over its categories."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [c for t in tasks for c in cases(t, n, split="eval")]


def _show(shown: dict, case: Case, per_category: int) -> bool:
    """Whether a case goes into the sample grid: the first ``per_category`` of each category."""
    key = (case.task, case.category)
    shown[key] = shown.get(key, 0) + 1
    return shown[key] <= per_category


def run(
    generate: Generate,
    n: int = 60,
    tasks: Sequence[str] = IMAGE_TASKS,
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    grid_per_category: int = 2,
    config: dict | None = None,
) -> Report:
    """Generate and judge n cases per image task; write report.json and samples.png to ``out_dir`` if given.
    Each case's torch generator is seeded from (seed, case), so results do not depend on the case order."""
    bad = [t for t in tasks if t not in IMAGE_TASKS]
    if bad:
        raise ValueError(f"run() scores image tasks ({', '.join(IMAGE_TASKS)}); use score_text() for {bad}")
    case_list = benchmark_cases(tasks, n)
    results, samples, shown = [], [], {}
    t0 = time.perf_counter()
    for case in tqdm(case_list, desc="ShapesBench", disable=not progress):
        inputs = case.input_images()
        g = torch.Generator().manual_seed(stable_hash("shapesbench", seed, case.name) % 2**63)
        output = generate(case.prompt, inputs, g)
        v = judge.check(case, output, inputs)
        results.append(CaseResult(case.task, case.category, case.seed, case.prompt, v.passed, v.reason, v.details))
        samples.append((inputs, output) if _show(shown, case, grid_per_category) else None)
    cfg = {"n": n, "tasks": list(tasks), "seed": seed, "seconds": round(time.perf_counter() - t0, 1), **(config or {})}
    report = Report(results, cfg)
    if out_dir is not None:
        report.save(out_dir, samples)
    return report


def score_text(
    answer_fn: Answer,
    n: int = 60,
    tasks: Sequence[str] = TEXT_TASKS,
    out_dir: str | Path | None = None,
    progress: bool = True,
    grid_per_category: int = 2,
    config: dict | None = None,
) -> Report:
    """Score an ``(image, question) -> answer`` function on n held-out understanding / reflection cases per
    task (exact answers after lowercasing and stripping a final period; reflection: the verdict)."""
    bad = [t for t in tasks if t not in TEXT_TASKS]
    if bad:
        raise ValueError(f"score_text() scores text tasks ({', '.join(TEXT_TASKS)}); use run() for {bad}")
    results, samples, shown = [], [], {}
    for case in tqdm(benchmark_cases(tasks, n), desc="ShapesBench text", disable=not progress):
        (image,) = case.input_images()
        reply = answer_fn(image, case.prompt)
        v = judge.check(case, reply)
        results.append(CaseResult(case.task, case.category, case.seed, case.prompt, v.passed, v.reason, v.details))
        samples.append(([image], reply) if _show(shown, case, grid_per_category) else None)
    report = Report(results, {"n": n, "tasks": list(tasks), **(config or {})})
    if out_dir is not None:
        report.save(out_dir, samples)
    return report


# -- the sample grid ---------------------------------------------------------------------------------------------

TILE, GAP, TEXT_W, MAX_INPUTS = CANVAS, 4, 460, 3


def grid(results: list[CaseResult], samples: list) -> PIL.Image.Image:
    """One row per shown case: input images, the output (image or answer text), a green (pass) or red (fail)
    bar, and the prompt with the judge's reason."""
    rows = [(r, s) for r, s in zip(results, samples) if s is not None]
    w = MAX_INPUTS * (TILE + GAP) + TILE + GAP + 8 + GAP + TEXT_W
    h = max(len(rows), 1) * (TILE + GAP) + GAP
    canvas = PIL.Image.new("RGB", (w, h), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (r, (inputs, output)) in enumerate(rows):
        y = GAP + i * (TILE + GAP)
        for k, im in enumerate(inputs[:MAX_INPUTS]):
            canvas.paste(im.convert("RGB").resize((TILE, TILE)), (GAP + k * (TILE + GAP), y))
        x = GAP + MAX_INPUTS * (TILE + GAP)
        if isinstance(output, PIL.Image.Image):
            canvas.paste(output.convert("RGB").resize((TILE, TILE)), (x, y))
            text = [r.prompt]
        else:
            text = [r.prompt, f"answer: {output}"]
        x += TILE + GAP
        draw.rectangle([x, y, x + 7, y + TILE - 1], fill=(40, 170, 60) if r.passed else (210, 40, 40))
        text = [f"{r.task} / {r.category}", *text, ("PASS" if r.passed else "FAIL: " + r.reason)]
        for k, line in enumerate(text):
            draw.text((x + 8 + GAP, y + 2 + 14 * k), line[:90], fill="black")
    return canvas


# -- command line ------------------------------------------------------------------------------------------------


def evaluate_model(
    model: str,
    n: int = 60,
    tasks: Sequence[str] = IMAGE_TASKS,
    out_dir: str | Path = "shapesbench",
    seed: int = 0,
    steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Report:
    """``omnigen2 eval shapes``: load a pipeline (or ``oracle``: the judge's self-check) and run ShapesBench."""
    if model == "oracle":
        generate = oracle(benchmark_cases(tasks, n))
    else:
        from ..pipelines import OmniGen2Pipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = OmniGen2Pipeline.from_pretrained(model, device=device)
        pipe.set_progress_bar_config(disable=True)
        generate = pipeline_generate(pipe, steps=steps)
    config = {"model": str(model), "steps": steps}
    return run(generate, n, tasks, out_dir, seed, progress=progress, config=config)
