"""Shapes World: the synthetic domain of the bundled default model (docs/SHAPES.md).

``world`` (scene model), ``render`` (64 x 64 renderer), ``tasks`` (case generators for every task and
category), ``judge`` (reads images back into scenes and scores cases) and ``dataset`` (training data).
"""

from .judge import Failure, Verdict, check, read
from .render import render
from .tasks import IMAGE_TASKS, TASKS, TEXT_TASKS, Case, Edit, Pattern, Relation, Target, cases, make_case, split_of
from .world import Object, Scene

__all__ = [
    "IMAGE_TASKS",
    "TASKS",
    "TEXT_TASKS",
    "Case",
    "Edit",
    "Failure",
    "Object",
    "Pattern",
    "Relation",
    "Scene",
    "Target",
    "Verdict",
    "cases",
    "check",
    "make_case",
    "read",
    "render",
    "split_of",
]
