"""The judge: 100% on the renderer's own outputs for every category (the contract's bar), and clear failures
on wrong outputs."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from omnigen2.shapes import judge
from omnigen2.shapes.render import render
from omnigen2.shapes.tasks import IMAGE_TASKS, TASKS, Edit, answer, make_case, seeds
from omnigen2.shapes.world import BACKGROUNDS, Object, Scene

# Both splits, so the bar holds for training targets and benchmark cases alike.
SEEDS = seeds("eval", 12) + seeds("train", 12)
IMAGE_CATEGORIES = [(t, c) for t in IMAGE_TASKS for c in TASKS[t]]


@pytest.mark.parametrize("task,category", IMAGE_CATEGORIES)
def test_rendered_targets_pass_every_image_category(task, category):
    for seed in SEEDS:
        case = make_case(task, category, seed)
        inputs = case.input_images()  # check() also reads every input back and compares it with the case's
        v = judge.check(case, case.render_target(), inputs)
        assert v.passed, (case.name, case.prompt, v.reason)
        if task == "ic":
            assert v.details["subject_consistency"] and v.details["arrangement"]
        if task == "edit":
            assert v.details["change_made"] and v.details["rest_kept"]


@pytest.mark.parametrize("category", TASKS["understanding"])
def test_understanding_answers_from_rendered_scenes_are_exact(category):
    for seed in SEEDS:
        case = make_case("understanding", category, seed)
        scene = judge.read(case.input_images()[0])
        assert scene == case.inputs[0]
        assert answer(case.prompt, scene) == case.answer
        assert judge.check(case, case.answer.capitalize() + ".").passed  # lowercased, final period stripped


@pytest.mark.parametrize("category", TASKS["reflection"])
def test_reflection_images_read_back_and_fixes_repair(category):
    for seed in SEEDS[:8]:
        case = make_case("reflection", category, seed)
        assert judge.read(case.input_images()[0]) == case.inputs[0]
        v = judge.check(case, case.answer)
        assert v.passed and v.details["exact"] and v.details["fix_repairs"] in (None, True)
        flipped = "the image matches the instruction." if category != "match" else "the image does not match..."
        assert not judge.check(case, flipped).passed


def test_every_shape_color_dot_and_background_reads_back():
    rng = np.random.default_rng(0)
    colors = list(judge.PALETTE_NAMES)
    for shape in ("circle", "square", "triangle", "cross"):
        for color in colors:
            for dot in [None, *[c for c in colors if c != color]]:
                bg = str(rng.choice(list(BACKGROUNDS)))
                scene = Scene(
                    (
                        Object(shape, color, dot, "center"),
                        Object("square", "blue" if color != "blue" else "red", None, "top left"),
                    ),
                    bg,
                )
                assert judge.read(render(scene, rng)) == scene


# -- failures ----------------------------------------------------------------------------------------------------


def _fails(case, scene_or_image, inputs=None):
    img = scene_or_image if isinstance(scene_or_image, PIL.Image.Image) else render(scene_or_image, 0)
    v = judge.check(case, img, inputs)
    assert not v.passed
    return v


def test_wrong_color_count_position_dot_and_background_fail():
    case = make_case("t2i", "attribute binding", 5)
    right = case.canonical()
    a = next(o for o in right.objects if o.dot)
    # Each failure also says what it got wrong (details["wrong"], FAILURE_KINDS), a right image nothing.
    assert judge.check(case, render(right)).details["wrong"] == []
    v = _fails(case, right.without(a).with_object(a.replace(dot=None)))  # missing dot
    assert "missing" in v.reason and v.details["wrong"] == ["dot"]
    other = next(c for c in judge.PALETTE_NAMES if c not in (a.color, a.dot))
    assert _fails(case, right.without(a).with_object(a.replace(color=other))).details["wrong"] == ["color"]
    v = _fails(case, Scene(right.objects, "mint"))
    assert "background" in v.reason and v.details["wrong"] == ["background"]
    both = Scene(right.without(a).with_object(a.replace(color=other, dot=None)).objects, "mint")
    assert _fails(case, both).details["wrong"] == ["background", "color", "dot"]

    count = make_case("t2i", "counting", 2)
    many = count.canonical()
    assert _fails(count, many.without(many.objects[0])).details["wrong"] == ["count"]  # one too few
    extra = many.with_object(many.objects[0].replace(cell=many.free_cells()[0]))
    assert _fails(count, extra).details["wrong"] == ["count"]  # one too many
    recolored = extra.without(extra.objects[0]).with_object(extra.objects[0].replace(color=other))
    assert _fails(count, recolored).details["wrong"] == ["count"]  # the extra one is the odd one out
    few = many.without(many.objects[0])  # "four yellow triangles": one too few, one of the rest a red cross
    few = few.without(few.objects[0]).with_object(few.objects[0].replace(shape="cross", color="red"))
    assert _fails(count, few).details["wrong"] == ["count", "color", "shape"]

    pos = make_case("t2i", "position", 1)
    good = pos.canonical()
    a, b = good.objects
    v = _fails(pos, Scene((a.replace(cell=b.cell), b.replace(cell=a.cell))))  # swapped
    assert "is not" in v.reason and v.details["wrong"] == ["relation"]
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert _fails(make_case("t2i", "single", 0), noise).details["wrong"] == ["unreadable"]


def test_edits_fail_when_other_objects_move_or_the_change_is_missing():
    case = next(c for c in (make_case("edit", "recolor", s) for s in range(50)) if len(c.inputs[0].objects) >= 2)
    before, after = case.inputs[0], case.target.scene()
    kept = next(o for o in after.objects if o in before.objects)
    moved = after.without(kept).with_object(kept.replace(cell=after.free_cells()[0]))
    v = _fails(case, moved)
    assert v.details["change_made"] and not v.details["rest_kept"]
    v = _fails(case, before)  # the input returned unchanged
    assert not v.details["change_made"] and v.details["rest_kept"]


def test_in_context_reports_subject_consistency_separately():
    case = make_case("ic", "place", 4)
    right = case.canonical()
    (obj,) = right.objects
    changed = Scene((obj.replace(dot=None if obj.dot else next(c for c in judge.PALETTE_NAMES if c != obj.color)),))
    v = _fails(case, changed)
    assert v.details["subject_consistency"] is False
    elsewhere = Scene((obj.replace(cell=right.free_cells()[0]),))
    v = _fails(case, elsewhere)
    assert v.details["subject_consistency"] and not v.details["arrangement"]


def test_blank_and_noise_images_fail():
    case = make_case("t2i", "single", 0)
    blank = PIL.Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert judge.read(blank) == Scene((), "gray")
    _fails(case, blank)
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert isinstance(judge.read(noise), judge.Failure)
    assert "unreadable" in _fails(case, noise).reason


def test_blobs_that_fit_no_shape_or_color_fail():
    base = np.full((64, 64, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    orange = base.copy()
    orange[24:40, 24:40] = (250, 140, 0)  # a square of no palette color
    thin = base.copy()
    thin[30:34, 20:44] = (220, 30, 30)  # a bar: no shape's box
    ring = base.copy()
    ring[24:40, 24:40] = (220, 30, 30)
    ring[28:36, 28:36] = BACKGROUNDS["gray"]  # a hole is not a dot
    diamond = base.copy()
    yy, xx = np.mgrid[:64, :64]
    diamond[np.abs(xx - 31.5) + np.abs(yy - 31.5) <= 8] = (220, 30, 30)  # a diamond: no shape fits
    for name, arr in [("orange", orange), ("thin", thin), ("ring", ring), ("diamond", diamond)]:
        got = judge.read(PIL.Image.fromarray(arr))
        assert isinstance(got, judge.Failure), (name, got)


def test_mixed_up_inputs_and_text_outputs_are_refused():
    case = make_case("edit", "remove", 3)
    other = make_case("edit", "remove", 4)
    with pytest.raises(ValueError, match="input image 1"):
        judge.check(case, case.render_target(), other.input_images())
    with pytest.raises(TypeError):
        judge.check(make_case("understanding", "count", 0), case.render_target())
    assert not judge.check(make_case("understanding", "count", 0), "many").passed
    move = make_case("edit", "move", 1)
    parsed = Edit.parse(move.prompt)
    assert parsed is not None and parsed.kind == "move" and parsed.prompt() == move.prompt  # round trip
