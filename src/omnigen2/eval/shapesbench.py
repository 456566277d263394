"""ShapesBench: score a model on held-out Shapes World cases with the judge (docs/SHAPES.md).

Image tasks (t2i, edit, ic) take a generator: any callable ``(prompt, input_images, generator) -> image``, or an
:class:`Output` (an image or the text answered instead, with details to record). :func:`pipeline_generate` wraps
an :class:`OmniGen2Pipeline`, :func:`chat_generate` an :class:`OmniGen2ChatPipeline` (the MLLM decides to draw,
then reflects), :func:`oracle` renders the right answers. Text tasks (understanding, reflection) take an
``(image, question) -> answer`` function: :func:`chat_answer` asks the chat's MLLM, :func:`text_oracle` answers
right. :func:`run` draws ``n`` cases per task from evaluation seeds (spread evenly over the task's categories),
lets the model answer, judges, and returns one :class:`Report` for all tasks: each category's pass rate with its
case count, each task's mean over its categories, the overall mean over tasks, the rates of the judge's partial
checks (subject consistency for in-context; change made / rest kept for edits; exact answer / fix repairs for
reflection) and, for images drawn with reflection, the reflection figures (rounds, first-image pass rate, how
often the MLLM's own first verdict agrees with the judge).
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
from ..shapes.tasks import (
    FAILURE_KINDS,
    IMAGE_TASKS,
    REFLECT_QUESTION,
    TASKS,
    TEXT_TASKS,
    Case,
    answer,
    cases,
    stable_hash,
)
from ..shapes.world import CANVAS

Answer = Callable[[PIL.Image.Image, str], str]
PARTIAL_CHECKS = ("subject_consistency", "arrangement", "change_made", "rest_kept", "exact", "fix_repairs", "drew")


@dataclass
class Output:
    """What a model made for an image case, when it is more than an image. ``value``: the image, or the text
    the model answered instead (the case fails); ``details`` go into the case's record. With reflection,
    ``judged`` is the image the first round judged and ``verdict`` that round's verdict ("match", "mismatch"
    or "unparsed"), to compare with the judge."""

    value: PIL.Image.Image | str
    details: dict = field(default_factory=dict)
    judged: PIL.Image.Image | None = None
    verdict: str | None = None


Generate = Callable[[str, list[PIL.Image.Image], torch.Generator | None], PIL.Image.Image | Output]


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
        """The mean of the task's category pass rates (not the pooled pass rate). For reflection this is the
        verdict agreement: the answer's match / mismatch against the case's."""
        cats = self.categories(task).values()
        return sum(p / n for p, n in cats) / len(cats)

    @property
    def overall(self) -> float:
        return sum(map(self.task_score, self.tasks)) / len(self.tasks) if self.tasks else 0.0

    def _details(self, task: str, key: str) -> list:
        return [r.details[key] for r in self.results if r.task == task and r.details.get(key) is not None]

    def partial(self, task: str) -> dict[str, dict]:
        """Rates of the judge's partial checks (e.g. subject consistency), over the cases that report them; with
        the chat, also how often the MLLM drew."""
        out = {}
        for key in PARTIAL_CHECKS:
            vals = self._details(task, key)
            if vals:
                out[key] = {"score": sum(vals) / len(vals), "n": len(vals)}
        return out

    def failures(self, task: str) -> dict[str, int]:
        """Over the task's failed image cases: how many got each :data:`FAILURE_KINDS` wrong (a case can count
        under several), and ``failed``, their number. Empty for text tasks."""
        rs = [r for r in self.results if r.task == task and not r.passed and "wrong" in r.details]
        if not rs:
            return {}
        counts = {kind: sum(kind in r.details["wrong"] for r in rs) for kind in FAILURE_KINDS}
        return {"failed": len(rs), **{k: v for k, v in counts.items() if v}}

    def reflection(self, task: str) -> dict | None:
        """Over the images the MLLM judged (``--reflect N``, N > 0; None without): the mean reflection rounds, how
        often the final image differs from the first drawing, and the judge's pass rate of the first drawing
        and of the final image (pooled, not per category)."""
        rs = [r for r in self.results if r.task == task and "first_passed" in r.details]
        if not rs:
            return None
        mean = lambda vals: sum(vals) / len(rs)  # noqa: E731
        return {
            "n": len(rs),
            "rounds": mean(r.details["reflect_rounds"] for r in rs),
            "image_changed": mean(r.details["image_changed"] for r in rs),
            "first_passed": mean(r.details["first_passed"] for r in rs),
            "final_passed": mean(r.passed for r in rs),
        }

    def self_verdict_agreement(self, task: str) -> dict | None:
        """How often the MLLM's first-round verdict on its own drawing agrees with the judge (a match for an
        image that passes, a mismatch for one that fails; an unparsed answer never agrees), with the counts of
        each (verdict, judge) pair. None without reflection."""
        rs = [r for r in self.results if r.task == task and "self_verdict" in r.details]
        if not rs:
            return None
        out = {"score": sum(r.details["self_verdict_agrees"] for r in rs) / len(rs), "n": len(rs)}
        for verdict in ("match", "mismatch"):
            for judged, ok in (("passed", True), ("failed", False)):
                out[f"{verdict}_{judged}"] = sum(
                    r.details["self_verdict"] == verdict and r.details["first_passed"] == ok for r in rs
                )
        out["unparsed"] = sum(r.details["self_verdict"] == "unparsed" for r in rs)
        return out

    def summary(self) -> dict:
        tasks = {}
        for t in self.tasks:
            cats = {c: {"score": p / n, "passed": p, "n": n} for c, (p, n) in self.categories(t).items()}
            n = sum(c["n"] for c in cats.values())
            tasks[t] = {"score": self.task_score(t), "n": n, "categories": cats, "partial": self.partial(t)}
            if (refl := self.reflection(t)) is not None:
                tasks[t]["reflection"] = refl
            if (agree := self.self_verdict_agreement(t)) is not None:
                tasks[t]["self_verdict_agreement"] = agree
            if failures := self.failures(t):
                tasks[t]["failures"] = failures
        return {"overall": self.overall, "tasks": tasks}

    def table(self) -> str:
        lines = [f"{'task':<14}{'category':<24}{'score':>7}{'cases':>7}"]
        row = lambda t, name, score, n: f"{t:<14}{name:<24}{score:>7.3f}{n:>7d}"  # noqa: E731
        tasks = self.summary()["tasks"]
        for t, s in tasks.items():
            for c, v in s["categories"].items():
                lines.append(row(t, c, v["score"], v["n"]))
            for key, v in s["partial"].items():
                lines.append(row(t, "(" + key.replace("_", " ") + ")", v["score"], v["n"]))
            if refl := s.get("reflection"):
                lines.append(row(t, "(reflection rounds)", refl["rounds"], refl["n"]))
                lines.append(row(t, "(image changed)", refl["image_changed"], refl["n"]))
                lines.append(row(t, "(first image passed)", refl["first_passed"], refl["n"]))
                lines.append(row(t, "(final image passed)", refl["final_passed"], refl["n"]))
            if agree := s.get("self_verdict_agreement"):
                lines.append(row(t, "(self verdict agreement)", agree["score"], agree["n"]))
            lines.append(row(t, "= mean", s["score"], s["n"]))
        lines.append(f"{'overall':<38}{self.overall:>7.3f}{len(self.results):>7d}")
        for t, s in tasks.items():
            if failures := s.get("failures"):
                kinds = ", ".join(f"{k} {v}" for k, v in failures.items() if k != "failed")
                lines.append(f"{t} failures ({failures['failed']} cases) got wrong: {kinds}")
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


# -- models ------------------------------------------------------------------------------------------------------


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


def chat_generate(
    chat,
    reflect: int = 0,
    steps: int | None = None,
    force_draw: bool = False,
    max_new_tokens: int | None = None,
    height: int = CANVAS,
    width: int = CANVAS,
    **kwargs,
) -> Generate:
    """An OmniGen2ChatPipeline as a generator: each case is a fresh one-turn conversation in which the MLLM
    decides to draw (``force_draw``: the answer starts with ``<|img|>``, for MLLMs that never learned to), then
    judges and repairs its drawing for up to ``reflect`` rounds. Returns an :class:`Output`: the final image
    (or the text answered instead) with the rounds in its details; ``max_new_tokens`` (None: the chat's default)
    and ``kwargs`` go to every chat call."""
    from ..pipelines.pipeline_chat import IMG_TOKEN

    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens

    def generate(prompt: str, input_images: list[PIL.Image.Image], generator: torch.Generator | None) -> Output:
        chat.reset()
        out = chat(
            prompt,
            input_images=input_images or None,
            reflect=reflect,
            generator=generator,
            height=height,
            width=width,
            num_inference_steps=steps,
            assistant_prefix=IMG_TOKEN if force_draw else "",
            **kwargs,
        )
        if not out.images:
            return Output(out.text, {"answer": out.text, "drew": False})
        final = out.images[0]
        first = out.rounds[0].judged if out.rounds else final
        details = {
            "answer": out.text,
            "drew": True,
            "reflect_rounds": len(out.rounds),
            "image_changed": first.tobytes() != final.tobytes(),
            "kept": out.kept,
            "rounds": [{"answer": r.answer, "verdict": r.verdict, "edited": r.image is not None} for r in out.rounds],
        }
        if not out.rounds:
            return Output(final, details)
        return Output(final, details, judged=first, verdict=out.rounds[0].verdict)

    return generate


def reflection_instruction(question: str) -> str | None:
    """The instruction of a reflection question (``REFLECT_QUESTION``), or None for any other question."""
    head, tail = REFLECT_QUESTION.split("{instruction}")
    if question.startswith(head) and question.endswith(tail) and len(question) > len(head) + len(tail):
        return question[len(head) : len(question) - len(tail)]
    return None


def chat_answer(
    chat,
    steps: int | None = None,
    max_new_tokens: int | None = None,
    height: int = CANVAS,
    width: int = CANVAS,
) -> Answer:
    """The chat's MLLM as an ``(image, question) -> answer`` function, greedy, in a fresh one-turn conversation
    (the question after the image): a reflection question goes through ``chat.judge(image, instruction)``,
    which asks exactly that question; any other through ``chat(question, [image])``, whose text is the answer
    (with ``<|img|>`` if it drew instead, drawn with ``steps``, which then fails). ``max_new_tokens`` (None: the
    chat's default) limits the latter; reflection answers keep the judge's limit, as in the reflection loop."""
    limit = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}

    def answer_fn(image: PIL.Image.Image, question: str) -> str:
        instruction = reflection_instruction(question)
        if instruction is not None:
            return chat.judge(image, instruction)
        chat.reset()
        out = chat(
            question,
            input_images=[image],
            num_inference_steps=steps,
            height=height,
            width=width,
            **limit,
        )
        return out.text

    return answer_fn


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


def text_oracle(case_list: Sequence[Case]) -> Answer:
    """Right answers to text cases: understanding from the judge's reading (:func:`oracle_answer`), reflection
    the case's own answer, found by question and image pixels."""
    table = {_key(c.prompt, c.input_images()): c for c in case_list if c.task == "reflection"}

    def answer_fn(image: PIL.Image.Image, question: str) -> str:
        if reflection_instruction(question) is None:
            return oracle_answer(image, question)
        case = table.get(_key(question, [image]))
        if case is None:
            raise KeyError(f"the oracle knows no reflection case with question {question!r} and this image")
        return case.answer

    return answer_fn


# -- running -----------------------------------------------------------------------------------------------------


def benchmark_cases(tasks: Sequence[str], n: int) -> list[Case]:
    """ShapesBench: n held-out cases per task (evaluation seeds only), spread evenly over its categories."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no tasks given; tasks are {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [c for t in tasks for c in cases(t, n, split="eval")]


def select_categories(case_list: Sequence[Case], tasks: Sequence[str], categories: Sequence[str]) -> list[Case]:
    """The cases of ``case_list`` in one of ``categories``; a name that is no category of ``tasks`` is an error."""
    known, wanted = {c for t in tasks for c in TASKS[t]}, set(categories)
    unknown = [c for c in categories if c not in known]
    if unknown:
        names = ", ".join(sorted(known))
        raise ValueError(f"unknown categories {unknown} for tasks {', '.join(tasks)}; they are {names}")
    kept = [c for c in case_list if c.category in wanted]
    if not kept:  # n spreads over all of a task's categories, so a small n can leave these without a case
        raise ValueError(f"no cases of categories {list(categories)} among the first cases of each task; raise --n")
    return kept


def case_generator(seed: int, case: Case) -> torch.Generator:
    """The noise ShapesBench draws ``case`` with under ``seed``: every tool that redraws a benchmark case (the
    reflection trace, the repair probe) seeds it the same way, so its drawings are the benchmark's."""
    return torch.Generator().manual_seed(stable_hash("shapesbench", seed, case.name) % 2**63)


def _show(shown: dict, case: Case, per_category: int) -> bool:
    """Whether a case goes into the sample grid: the first ``per_category`` of each category."""
    key = (case.task, case.category)
    shown[key] = shown.get(key, 0) + 1
    return shown[key] <= per_category


def _judge_image(case: Case, made: PIL.Image.Image | Output, inputs: list[PIL.Image.Image]) -> judge.Verdict:
    """Judge an image case's output; a text answer fails (its partial checks fail as an unreadable image's
    do); with reflection the details add the judge's reading of the first drawing and the MLLM's verdict."""
    made = made if isinstance(made, Output) else Output(made)
    if isinstance(made.value, str):
        short = made.value if len(made.value) <= 80 else made.value[:77] + "..."
        failed = {"ic": ("subject_consistency", "arrangement"), "edit": ("change_made", "rest_kept")}
        details = {"read": None, **dict.fromkeys(failed.get(case.task, ()), False), **made.details}
        return judge.Verdict(False, f"answered with text: {short!r}", details)
    v = judge.check(case, made.value, inputs)
    details = {**v.details, **made.details}
    if made.judged is not None:
        first = judge.check(case, made.judged, inputs).passed
        agrees = made.verdict == ("match" if first else "mismatch")
        details |= {"first_passed": first, "self_verdict": made.verdict, "self_verdict_agrees": agrees}
    return judge.Verdict(v.passed, v.reason, details)


def run(
    generate: Generate | None = None,
    n: int = 60,
    tasks: Sequence[str] = IMAGE_TASKS,
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    grid_per_category: int = 2,
    config: dict | None = None,
    answer_fn: Answer | None = None,
    case_list: Sequence[Case] | None = None,
) -> Report:
    """Score n cases per task — image tasks with ``generate``, text tasks with ``answer_fn`` — in one report;
    write report.json and samples.png to ``out_dir`` if given. Each image case's torch generator is seeded
    from (seed, case), so results do not depend on the case order. ``case_list`` scores these cases instead of
    the first n of each task (e.g. one category)."""
    if case_list is None:
        case_list = benchmark_cases(tasks, n)
    if generate is None and any(t in IMAGE_TASKS for t in tasks):
        raise ValueError(f"image tasks ({', '.join(t for t in tasks if t in IMAGE_TASKS)}) need a generator")
    if answer_fn is None and any(t in TEXT_TASKS for t in tasks):
        raise ValueError(f"text tasks ({', '.join(t for t in tasks if t in TEXT_TASKS)}) need an answer function")
    results, samples, shown = [], [], {}
    t0 = time.perf_counter()
    for case in tqdm(case_list, desc="ShapesBench", disable=not progress):
        inputs = case.input_images()
        if case.task in TEXT_TASKS:
            output = answer_fn(inputs[0], case.prompt)
            v = judge.check(case, output)
        else:
            made = generate(case.prompt, inputs, case_generator(seed, case))
            v = _judge_image(case, made, inputs)
            output = made.value if isinstance(made, Output) else made
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
    """:func:`run` on text tasks only: score an ``(image, question) -> answer`` function on n held-out
    understanding / reflection cases per task (exact answers after lowercasing and stripping a final period;
    reflection: the verdict)."""
    bad = [t for t in tasks if t not in TEXT_TASKS]
    if bad:
        raise ValueError(f"score_text() scores text tasks ({', '.join(TEXT_TASKS)}); use run() for {bad}")
    return run(None, n, tasks, out_dir, 0, progress, grid_per_category, config, answer_fn=answer_fn)


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
    reflect: int | None = None,
    force_draw: bool = False,
    max_new_tokens: int | None = None,
    text_guidance: float | None = None,
    image_guidance: float | None = None,
    categories: Sequence[str] | None = None,
    reflect_candidates: int | None = None,
) -> Report:
    """``omnigen2 eval shapes``: load a pipeline (or ``oracle``: the judge's self-check) and run ShapesBench on
    image and text tasks together. Image tasks draw through the generation pipeline, or with ``reflect=N``
    through the chat pipeline (the MLLM decides to draw, ``force_draw`` makes it, then N reflection rounds);
    text tasks are answered by the chat's MLLM. ``text_guidance`` / ``image_guidance`` replace the checkpoint's
    guidance scales for every image case; ``categories`` keeps only the cases of these categories (of the n per
    task); ``reflect_candidates`` replaces the checkpoint's repairs drawn per reflection round."""
    case_list = benchmark_cases(tasks, n)  # unknown tasks fail before the model loads
    if categories:
        case_list = select_categories(case_list, tasks, categories)
    guidance = {}
    for flag, key, value in (
        ("--text-guidance", "text_guidance_scale", text_guidance),
        ("--image-guidance", "image_guidance_scale", image_guidance),
    ):
        if value is not None:
            if not value >= 1.0:  # below 1 the guided prediction moves away from the condition
                raise ValueError(f"{flag} must be >= 1, got {value}")
            guidance[key] = value
    if reflect is not None and reflect < 0:
        raise ValueError(f"--reflect must be >= 0, got {reflect}")
    if force_draw and reflect is None:
        raise ValueError("--force-draw applies to the chat path: give --reflect N (N = 0 for no reflection)")
    if reflect_candidates is not None:
        if not reflect:
            raise ValueError("--reflect-candidates applies to reflection: give --reflect N with N > 0")
        if reflect_candidates < 1:
            raise ValueError(f"--reflect-candidates must be >= 1, got {reflect_candidates}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if model == "oracle":
        if reflect is not None:
            raise ValueError("--reflect needs a model; the oracle renders the right answers")
        generate, answer_fn = oracle(case_list), text_oracle(case_list)
    else:
        from ..pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = OmniGen2Pipeline.from_pretrained(model, device=device)
        pipe.set_progress_bar_config(disable=True)
        # Shares the pipeline's components; ShapesBench asks its own questions whatever the checkpoint names.
        chat = OmniGen2ChatPipeline(pipe, reflection="shapes")
        if reflect is None:
            generate = pipeline_generate(pipe, steps=steps, **guidance)
        else:
            extra = {} if reflect_candidates is None else {"reflect_candidates": reflect_candidates}
            generate = chat_generate(chat, reflect, steps, force_draw, max_new_tokens, **guidance, **extra)
        answer_fn = chat_answer(chat, steps, max_new_tokens)
    config = {
        "model": str(model),
        "steps": steps,
        "images": "pipeline" if reflect is None else "chat",
        "reflect": reflect,
        "reflect_candidates": reflect_candidates,
        "force_draw": force_draw,
        "max_new_tokens": max_new_tokens,
        **guidance,
        "categories": list(categories) if categories else None,
    }
    return run(
        generate, n, tasks, out_dir, seed, progress=progress, config=config, answer_fn=answer_fn, case_list=case_list
    )
