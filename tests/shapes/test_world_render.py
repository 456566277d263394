"""The scene model and the renderer follow SHAPES_WORLD.md: names, rules, captions, canvas geometry."""

from __future__ import annotations

import numpy as np
import pytest

from omnigen2.shapes.render import render, render_array
from omnigen2.shapes.world import BACKGROUNDS, COLORS, InvalidScene, Object, Scene, relation_holds


def test_palettes_and_names_match_the_contract():
    assert BACKGROUNDS == {
        "gray": (235, 235, 235),
        "beige": (240, 225, 190),
        "sky": (200, 225, 250),
        "mint": (205, 240, 205),
    }
    assert COLORS["red"] == (220, 30, 30) and COLORS["purple"] == (140, 50, 190) and COLORS["black"] == (30, 30, 30)
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "black"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: Object("square", "red", "red", "top"),  # dot of the object's color
        lambda: Object("hexagon", "red", None, "top"),
        lambda: Object("square", "orange", None, "top"),
        lambda: Object("square", "red", None, "middle"),
        lambda: Scene((Object("square", "red", None, "top"), Object("circle", "blue", None, "top"))),
        lambda: Scene((), "white"),
    ],
)
def test_invalid_objects_and_scenes_are_refused(make):
    with pytest.raises(InvalidScene):
        make()


def test_relations_compare_columns_or_rows_only():
    assert relation_holds("left of", "bottom left", "top")  # rows may differ
    assert not relation_holds("left of", "top", "bottom")  # same column
    assert relation_holds("above", "top right", "left") and relation_holds("below", "bottom", "center")
    assert relation_holds("right of", "right", "top left")


def test_scenes_are_sets_in_reading_order_and_captions_are_canonical():
    a = Object("square", "red", "yellow", "bottom right")
    b = Object("circle", "blue", None, "top left")
    c = Object("cross", "green", None, "center")
    assert Scene((a, b, c), "beige") == Scene((c, a, b), "beige")
    assert Scene((a, b, c), "beige").caption() == (
        "a blue circle at the top left, a green cross at the center and "
        "a red square with a yellow dot at the bottom right on a beige background"
    )
    assert (
        Scene((a, b)).caption()
        == "a blue circle at the top left and a red square with a yellow dot at the bottom right"
    )
    assert Scene((c,)).caption() == "a green cross at the center"


def test_render_is_64x64_rgb_and_deterministic_given_a_seed():
    scene = Scene((Object("triangle", "purple", "yellow", "left"), Object("cross", "black", None, "top")), "sky")
    img = render(scene, 7)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(render(scene, 7)))
    assert not np.array_equal(np.asarray(img), np.asarray(render(scene, 8)))  # jitter


def test_canonical_geometry_without_jitter():
    px = lambda obj: render_array(Scene((obj,))).astype(int)  # noqa: E731
    is_red = lambda a: np.abs(a - COLORS["red"]).sum(-1) < 3  # noqa: E731
    sq = is_red(px(Object("square", "red", None, "center")))
    ys, xs = np.nonzero(sq)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (24, 39, 24, 39) and sq.sum() == 256  # box 16 at 32
    tl = is_red(px(Object("square", "red", None, "top left")))
    assert np.nonzero(tl)[1].min() == 3  # centered at 11
    tri = is_red(px(Object("triangle", "red", None, "center")))
    assert tri[24:32].sum() < tri[32:40].sum() / 2  # apex up
    assert 0.4 < tri.sum() / 256 < 0.55
    cross = is_red(px(Object("cross", "red", None, "center")))
    assert cross[24:27, 24:27].sum() == 0 and cross[30:34, 24:40].all()  # empty corners, full arms
    # Pixels at least half covered: nearer red than the background.
    a = px(Object("circle", "red", None, "center"))
    circle = np.linalg.norm(a - COLORS["red"], axis=-1) < np.linalg.norm(a - BACKGROUNDS["gray"], axis=-1)
    assert abs(circle.sum() / 256 - np.pi / 4) < 0.03
    dotted = render_array(Scene((Object("square", "red", "yellow", "center"),))).astype(int)
    dot = np.abs(dotted - COLORS["yellow"]).sum(-1) < 60
    assert 20 <= dot.sum() <= 36 and dot[29:35, 29:35].sum() == dot.sum()  # diameter 6 at the box center
    bg = render_array(Scene((), "mint"))
    assert (bg == BACKGROUNDS["mint"]).all()
