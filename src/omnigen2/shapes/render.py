"""The Shapes World renderer: a :class:`Scene` to a 64 x 64 RGB image.

Shapes are evaluated analytically at every pixel center of a 4x canvas (256 x 256) and box-filtered down,
which gives anti-aliased edges without depending on a drawing library's rasterisation rules. With an rng,
each object's box side and center get a uniform jitter of up to +-1 px (at 64 x 64), as the contract allows;
without one the rendering is the exact canonical geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from .world import BACKGROUNDS, BOX, CANVAS, COLORS, DOT_DIAMETER, SUPERSAMPLE, Object, Scene, cell_center

JITTER = 1.0  # px at 64 x 64, for both the box side and the center


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn, in 64 x 64 pixel units (continuous coordinates: the canvas is [0, 64])."""

    cx: float
    cy: float
    side: float


def place(obj: Object, rng: np.random.Generator | None = None) -> Placement:
    cx, cy = cell_center(obj.cell)
    if rng is None:
        return Placement(float(cx), float(cy), float(BOX))
    dx, dy, ds = rng.uniform(-JITTER, JITTER, size=3)
    return Placement(cx + dx, cy + dy, BOX + ds)


def shape_mask(shape: str, p: Placement, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y) lie inside the shape. x, y broadcast; same units as ``p``."""
    u, v, h = x - p.cx, y - p.cy, p.side / 2
    in_box = (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "circle":
        return u**2 + v**2 <= h**2
    if shape == "square":
        return in_box
    if shape == "triangle":
        # Isosceles, apex up at the top edge's middle, base = the box's bottom edge: the half-width grows
        # from 0 at v = -h to h at v = +h.
        return in_box & (np.abs(u) <= (v + h) / 2)
    if shape == "cross":
        arm = p.side / 6  # half of the arm width side / 3
        return in_box & ((np.abs(u) <= arm) | (np.abs(v) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def dot_mask(p: Placement, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x - p.cx) ** 2 + (y - p.cy) ** 2 <= (DOT_DIAMETER / 2) ** 2


def _window(center: float, side: float, n: int) -> slice:
    """The 4x pixels an object's box (plus a margin pixel) covers along one axis: only those can change."""
    lo = int((center - side / 2 - 1) * SUPERSAMPLE)
    hi = int((center + side / 2 + 1) * SUPERSAMPLE) + 1
    return slice(max(lo, 0), min(hi, n))


def render_array(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(64, 64, 3) uint8."""
    n = CANVAS * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel centers of the 4x canvas, in 64 x 64 units
    big = np.empty((n, n, 3), dtype=np.float32)
    big[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        p = place(obj, rng)
        rows, cols = _window(p.cy, p.side, n), _window(p.cx, p.side, n)
        x, y, window = coords[None, cols], coords[rows, None], big[rows, cols]
        window[shape_mask(obj.shape, p, x, y)] = COLORS[obj.color]
        if obj.dot:
            window[dot_mask(p, x, y)] = COLORS[obj.dot]
    small = big.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE, 3).mean(axis=(1, 3))  # box filter
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator | int | None = None) -> PIL.Image.Image:
    """Render a scene. ``rng``: a numpy Generator or an int seed for jitter; None for no jitter.
    The same scene and seed always give the same image."""
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    return PIL.Image.fromarray(render_array(scene, rng))
