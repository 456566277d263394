"""Recognise prompts of the Shapes World grammar (docs/SHAPES.md, shared/docs/SHAPES_WORLD.md).

:func:`parse` returns ``(task, category)`` for a prompt of the grammar, or None. The bundled model only
knows this grammar: the pipeline warns on anything else (:func:`domain_warning`), and the chat pipeline uses the
task to decide between drawing (``<|img|>``) and answering in text.
"""

from __future__ import annotations

import re

from .tasks import Edit
from .world import BACKGROUNDS, CELLS, COLORS, NUMBERS, RELATIONS, SHAPES, plural


def _alt(names) -> str:
    return "(?:" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + ")"


COLOR, SHAPE, CELL, BG = _alt(COLORS), _alt(SHAPES), _alt(CELLS), _alt(BACKGROUNDS)
# Plurals: the English ones ("crosses") and the contract's literal "{shape}s" ("crosss").
PLURAL = _alt({plural(s) for s in SHAPES} | {s + "s" for s in SHAPES})
NUMBER = _alt(NUMBERS[2:5])
REL = _alt(RELATIONS)
OBJ = rf"a {COLOR} {SHAPE}"
DOTTED = rf"{OBJ} with a {COLOR} dot"

PATTERNS: list[tuple[str, str, str]] = [
    ("t2i", "attribute binding", rf"{DOTTED} and {OBJ}"),
    ("t2i", "two", rf"{OBJ} and {OBJ}"),
    ("t2i", "position", rf"{OBJ} {REL} {OBJ}"),
    ("t2i", "counting", rf"{NUMBER} {COLOR} {PLURAL}"),
    ("t2i", "single", rf"{OBJ}(?: with a {COLOR} dot)?(?: at the {CELL})?(?: on a {BG} background)?"),
    ("ic", "place", rf"put the object from image 1 at the {CELL}"),
    ("ic", "relate", rf"put the object from image 1 {REL} the object from image 2"),
    ("ic", "row", r"put the objects from image 1, image 2 and image 3 in a row from left to right"),
    ("ic", "into scene", rf"add the object from image 1 to image 2 at the {CELL}"),
    ("understanding", "caption", r"describe the image"),
    ("understanding", "count", rf"how many {PLURAL} are there\?"),
    ("understanding", "color", rf"what color is the {SHAPE}\?"),
    ("understanding", "position", rf"where is the {COLOR} {SHAPE}\?"),
    ("reflection", "verdict", r'does the image match the instruction ".+"\?'),
]
_COMPILED = [(task, cat, re.compile(p)) for task, cat, p in PATTERNS]


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split()).removesuffix(".")


def parse(prompt: str) -> tuple[str, str] | None:
    """(task, category) of a Shapes World prompt, or None when the prompt is outside the grammar."""
    text = normalize(prompt)
    edit = Edit.parse(text)
    if edit is not None:
        return "edit", edit.kind
    for task, category, pattern in _COMPILED:
        if pattern.fullmatch(text):
            return task, category
    return None


def in_grammar(prompt: str) -> bool:
    return parse(prompt) is not None


def domain_warning(prompt: str) -> str | None:
    """What the pipeline warns about ``prompt`` outside the grammar, None inside it. Registered as the ``shapes``
    domain (pyproject.toml, ``omnigen2.domains``), which the bundled checkpoint names in model_index.json."""
    if in_grammar(prompt):
        return None
    shown = repr(prompt) if len(prompt) <= 80 else f"{prompt[:60]!r}... ({len(prompt)} characters)"  # never all of it
    return (
        f"the bundled model only knows the Shapes World (docs/SHAPES.md); {shown} is outside its grammar, so "
        "expect an arbitrary arrangement of shapes. For general prompts load the released weights: "
        "OmniGen2Pipeline.from_pretrained('OmniGen2/OmniGen2') or --model OmniGen2/OmniGen2"
    )
