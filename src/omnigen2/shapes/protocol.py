"""The Shapes World reflection protocol: the question the bundled model's MLLM was trained to answer about its
own drawings, and the reading of its two answer sentences.

Registered as ``shapes`` in the ``omnigen2.reflection`` entry points (pyproject.toml); the bundled checkpoint
names it in model_index.json (``"omnigen2_reflection": "shapes"``). docs/CHAT.md, "Reflection protocols".
"""

from __future__ import annotations

from ..pipelines.reflection import ReflectionProtocol
from .judge import verdict_of
from .tasks import MATCHES, MISMATCH, REFLECT_QUESTION


def parse_reflection(text: str) -> tuple[str, str | None, str | None]:
    """A reflection answer -> (verdict, problem, fix). The verdict is the ShapesBench judge's reading
    (:func:`omnigen2.shapes.judge.verdict_of`); a mismatch must read "... instruction: {problem}. {fix}", else the
    answer is "unparsed"."""
    verdict = verdict_of(text)
    if verdict == "match":
        return "match", None, None
    if verdict == "mismatch":
        head = MISMATCH.split("{problem}")[0].strip()  # "the image does not match the instruction:"
        body = text.strip()[len(head) :].strip()
        problem, sep, fix = body.rpartition(". ")  # the judge splits at the last ". " too
        if sep and problem.strip() and fix.strip():
            return "mismatch", problem.strip(), fix.strip()
    return "unparsed", None, None


SHAPES = ReflectionProtocol(
    name="shapes",
    template=REFLECT_QUESTION,
    parser=parse_reflection,
    # Every trained answer starts with one of these; the score is read where they part ("the image| matches" /
    # "the image| does not match").
    verdicts=(MATCHES, MISMATCH),
    max_new_tokens=64,
)

__all__ = ["SHAPES", "parse_reflection"]
