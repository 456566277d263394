"""Case generators: determinism, the train / eval seed split, the grammar of SHAPES_WORLD.md, edits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from omnigen2.shapes.tasks import TASKS, Edit, cases, make_case, seeds, split_of
from omnigen2.shapes.world import Object, Scene

# The grammar, written out from SHAPES_WORLD.md (independently of the generators).
C = "(red|green|blue|yellow|purple|black)"
S = "(circle|square|triangle|cross)"
SS = "(circles|squares|triangles|crosses)"
CELL = "(top left|top right|bottom left|bottom right|top|left|center|right|bottom)"
BG = "(gray|beige|sky|mint)"
REL = "(left of|right of|above|below)"
GRAMMAR = {
    ("t2i", "single"): f"a {C} {S}( with a {C} dot)?( at the {CELL})?( on a {BG} background)?",
    ("t2i", "two"): f"a {C} {S} and a {C} {S}",
    ("t2i", "counting"): f"(two|three|four) {C} {SS}",
    ("t2i", "colors"): f"a {C} {S}",
    ("t2i", "position"): f"a {C} {S} {REL} a {C} {S}",
    ("t2i", "attribute binding"): f"a {C} {S} with a {C} dot and a {C} {S}",
    ("edit", "recolor"): f"make the {C} {S} {C}",
    ("edit", "remove"): f"remove the {C} {S}",
    ("edit", "add"): f"add a {C} {S} at the {CELL}",
    ("edit", "move"): f"move the {C} {S} to the {CELL}",
    ("edit", "reshape"): f"turn the {C} {S} into a {S}",
    ("edit", "background"): f"change the background to {BG}",
    ("ic", "place"): f"put the object from image 1 at the {CELL}",
    ("ic", "relate"): f"put the object from image 1 {REL} the object from image 2",
    ("ic", "row"): "put the objects from image 1, image 2 and image 3 in a row from left to right",
    ("ic", "into scene"): f"add the object from image 1 to image 2 at the {CELL}",
    ("understanding", "caption"): re.escape("describe the image."),
    ("understanding", "count"): f"how many {SS} are there\\?",
    ("understanding", "color"): f"what color is the {S}\\?",
    ("understanding", "position"): f"where is the {C} {S}\\?",
}
FIX = "|".join(f"({v})" for (t, _), v in GRAMMAR.items() if t == "edit")
ANSWERS = {
    "count": "(zero|one|two|three|four)",
    "color": C,
    "position": CELL,
    "caption": f"a {C} {S}( with a {C} dot)? at the {CELL}((, | and )a {C} {S}( with a {C} dot)? at the {CELL})*"
    f"( on a (beige|sky|mint) background)?",
}


@pytest.mark.parametrize("task,category", list(GRAMMAR))
def test_prompts_follow_the_grammar(task, category):
    for seed in range(40):
        case = make_case(task, category, seed)
        assert re.fullmatch(GRAMMAR[task, category], case.prompt), case.prompt
        if task == "understanding":
            assert re.fullmatch(ANSWERS[category], case.answer), case.answer


def test_reflection_answers_follow_the_format():
    for category in TASKS["reflection"]:
        for seed in range(15):
            case = make_case("reflection", category, seed)
            if category == "match":
                assert case.answer == "the image matches the instruction."
            else:
                m = re.fullmatch(r"the image does not match the instruction: ([a-z ]+)\. (.*)", case.answer)
                assert m and re.fullmatch(FIX, m[2]), case.answer
            assert case.prompt == f'does the image match the instruction "{case.instruction}"?'


def test_spot_checks_of_exact_strings():
    assert Edit("recolor", "red", "square", "blue").prompt() == "make the red square blue"
    assert Edit("move", "green", "cross", "bottom left").prompt() == "move the green cross to the bottom left"
    assert Edit("reshape", "black", "circle", "triangle").prompt() == "turn the black circle into a triangle"
    assert Edit("background", value="mint").prompt() == "change the background to mint"
    assert Edit("add", "yellow", "triangle", "top").prompt() == "add a yellow triangle at the top"
    assert make_case("t2i", "colors", 3).prompt.endswith(" square")  # the colors category fixes the shape


def test_edits_parse_and_apply():
    scene = Scene((Object("square", "red", "yellow", "top"), Object("circle", "blue", None, "center")), "sky")
    e = Edit.parse("Move the red square to the bottom right.")
    assert e == Edit("move", "red", "square", "bottom right")
    assert e.apply(scene).at("bottom right") == Object("square", "red", "yellow", "bottom right")
    assert Edit.parse("make the blue circle purple").apply(scene).at("center").color == "purple"
    assert Edit.parse("remove the blue circle").apply(scene).objects == (scene.objects[0],)
    assert Edit.parse("change the background to gray").apply(scene).background == "gray"
    assert Edit.parse("paint it red") is None


def test_generators_are_deterministic():
    for task, cats in TASKS.items():
        for cat in cats:
            a, b = make_case(task, cat, 11), make_case(task, cat, 11)
            assert a == b
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.input_images(), b.input_images()))
            if a.target is not None:
                assert a.canonical() == b.canonical()
    assert len({make_case("edit", "move", s).prompt + str(make_case("edit", "move", s).inputs) for s in range(20)}) > 15


def test_canonical_targets_satisfy_their_cases():
    for task in ("t2i", "edit", "ic"):
        for case in cases(task, 60, split="train"):
            ok, why = case.target.check(case.canonical())
            assert ok, (case.name, why)


def test_seed_splits_are_disjoint_and_enforced():
    train, held = seeds("train", 2000), seeds("eval", 300)
    assert not set(train) & set(held)
    assert all(split_of(s) == "eval" for s in held) and all(split_of(s) == "train" for s in train)
    assert 0.08 < len(held) / max(held) < 0.18  # about one seed in eight is held out
    with pytest.raises(ValueError, match="eval seed"):
        make_case("t2i", "single", held[0], split="train")
    make_case("t2i", "single", held[0], split="eval")


def test_a_held_out_set_of_300_cases_per_task_is_constructible():
    for task, cats in TASKS.items():
        held = cases(task, 300, split="eval")
        assert len(held) == 300 and all(split_of(c.seed) == "eval" for c in held)
        assert {c.category for c in held} == set(cats)
        assert len({(c.category, c.seed) for c in held}) == 300
