"""The ShapesBench judge: read a 64 x 64 image back into a :class:`Scene`, and score a case's output.

Reading follows the contract's "Scoring" section step by step:

1. background: the median color of the image border, mapped to the nearest background palette entry;
2. segmentation: pixels far from that background, labelled into 4-connected components;
3. per component: its color (the mean of its interior, without the dot, mapped to the nearest palette
   color), its shape (each ideal shape is fitted to the component's coverage by moments — side from the area,
   box center from the centroid — and the best soft IoU wins), its dot (an enclosed component of another
   palette color at the box center) and its cell (the fitted box center's nearest cell center).

A component that fits no shape, no color or has an unexplained inner blob makes the read fail, and so the
case. Components smaller than ``MIN_BLOB`` pixels are specks, not objects (an object covers >= 100 pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import PIL.Image

from .render import Placement, shape_mask
from .tasks import MATCHES, MISMATCH, TEXT_TASKS, Case, Edit, Pattern
from .world import BACKGROUNDS, CANVAS, CELL_CENTERS, COLORS, SHAPES, InvalidScene, Object, Scene, cell_at, phrase

# Thresholds in RGB distance. Background palette entries are >= 172 from every object color, and object
# colors are >= 116 from each other (blue-purple), so these leave wide margins on both sides.
BG_TOL = 45.0  # the border's median color must be this close to a palette background
FG_DIST = 40.0  # a pixel this far from the background belongs to an object (~ >20% coverage)
CORE_DIST = 45.0  # a pixel this close to a palette color is that color, not an edge blend
COLOR_TOL = 60.0  # a blob's mean interior color must be this close to its palette color
# Geometry, in pixels at 64 x 64.
MIN_BLOB = 10  # smaller components are specks and are ignored
SIDE_RANGE = (12, 21)  # box side 16 +- 1 by the contract; generated images get +-4
MAX_ASPECT = 1.25  # a box is square; the triangle's faint apex makes it ~1-2 px shorter (renders: <= 1.15)
MIN_IOU = 0.9  # soft IoU of the best fitted ideal shape: renders score >= 0.95, wrong shapes <= 0.85
DOT_AREA = (6, 60)  # pure-colored dot pixels: a 6 px dot has ~28 pixels, ~15-28 of them pure
DOT_OFFSET = 3.0  # the dot center may be this far from the box center
ENCLOSED = 0.75  # share of a dot's surrounding pixels inside the object (a triangle's dot nearly meets its edges)
SPECK = 3  # stray pure pixels of another color below this many are edge blends

# Shape area / box area, and how far the centroid lies below the box center (in box sides): the triangle's
# centroid is 2/3 of the way from apex to base, i.e. side / 6 below the center.
AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
CENTROID_BELOW_CENTER = {"triangle": 1 / 6}

PALETTE_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (6, 3)


@dataclass(frozen=True)
class Failure:
    """The image could not be read as a valid scene; ``reason`` says why."""

    reason: str

    def __bool__(self) -> bool:  # so ``if not read(img)`` reads naturally
        return False


# -- pixel helpers ---------------------------------------------------------------------------------------------


def as_array(image) -> np.ndarray:
    """(64, 64, 3) float32 RGB from a PIL image, an array or an image file; other sizes are box-resized to
    64 x 64 first."""
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as im:
            return as_array(im.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), PIL.Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: (labels with 0 = not in mask and 1..n, n). Min-label propagation with pointer
    jumping, vectorised; converges in a few dozen sweeps on 64 x 64 masks."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new[~mask] = none
        flat = np.append(new.ravel(), none)
        new = flat[new]  # jump to the label of the label (each label is a pixel index of the same component)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense, int(len(roots) - (not mask.all()))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every region of its complement that does not reach the border."""
    lab, _ = label(~mask)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return mask | ~np.isin(lab, border)


def erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def nearest_color(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into PALETTE_NAMES of the nearest object color, and its distance, for (..., 3) colors."""
    d = np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1)
    return d.argmin(-1), d.min(-1)


# -- reading ---------------------------------------------------------------------------------------------------


def read_background(rgb: np.ndarray) -> tuple[str, np.ndarray] | Failure:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    est = np.median(border, axis=0)
    dists = {name: float(np.linalg.norm(est - np.array(c))) for name, c in BACKGROUNDS.items()}
    name = min(dists, key=dists.get)
    if dists[name] > BG_TOL:
        return Failure(f"the background {tuple(int(v) for v in est)} fits no background color")
    return name, est


def read(image) -> Scene | Failure:
    """The scene an image shows, or why it shows none."""
    rgb = as_array(image)
    bg = read_background(rgb)
    if isinstance(bg, Failure):
        return bg
    bg_name, bg_rgb = bg
    dist_bg = np.linalg.norm(rgb - bg_rgb, axis=-1)
    labels, n = label(dist_bg > FG_DIST)
    objects = []
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < MIN_BLOB:
            continue
        obj = read_blob(*_crop(comp, rgb, dist_bg), bg_rgb)
        if isinstance(obj, Failure):
            return obj
        objects.append(obj)
    try:
        return Scene(tuple(objects), bg_name)
    except InvalidScene as e:
        return Failure(str(e))


def _crop(comp: np.ndarray, rgb: np.ndarray, dist_bg: np.ndarray, pad: int = 2):
    """The component's bounding box plus a margin (so per-blob work runs on ~20 x 20 arrays, with the same
    results as on the whole image), and the crop's (x, y) offset in the image."""
    ys, xs = np.nonzero(comp)
    y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    window = (slice(y0, ys.max() + pad + 1), slice(x0, xs.max() + pad + 1))
    return comp[window], rgb[window], dist_bg[window], (int(x0), int(y0))


def _where(mask: np.ndarray, offset: tuple[int, int]) -> str:
    ys, xs = np.nonzero(mask)
    return f"the blob at ({xs.mean() + offset[0]:.0f}, {ys.mean() + offset[1]:.0f})"


def read_blob(
    comp: np.ndarray, rgb: np.ndarray, dist_bg: np.ndarray, offset: tuple[int, int], bg_rgb: np.ndarray
) -> Object | Failure:
    """One component (cropped; ``offset`` is the crop's position in the image) as an object."""
    where = _where(comp, offset)
    filled = fill_holes(comp)
    idx, dist = nearest_color(rgb)
    core = filled & (dist < CORE_DIST)
    if not core.any():
        return Failure(f"{where} has no palette color")
    main = int(np.bincount(idx[core], minlength=len(PALETTE)).argmax())  # the majority pure color
    # Coverage by the main color against the background (a blend's distance is proportional to it).
    cover = np.clip(dist_bg / np.linalg.norm(PALETTE[main] - bg_rgb), 0.0, 1.0) * dilate(filled)
    shape = read_shape(filled, cover >= 0.5, cover)
    if isinstance(shape, Failure):
        return Failure(f"{where}: {shape.reason}")
    name, box = shape
    center = box.cx, box.cy
    dot = read_dot(rgb, core & (idx != main), filled, center)
    if isinstance(dot, Failure):
        return Failure(f"{where}: {dot.reason}")
    dot_name, dot_region = dot
    interior = erode(filled) & ~dilate(dot_region)
    if not interior.any():
        return Failure(f"{where} is too thin to be an object")
    mean = rgb[interior].mean(0)
    k, d = nearest_color(mean)
    if d > COLOR_TOL or int(k) != main:
        return Failure(f"{where} has mean color {tuple(int(v) for v in mean)}, which fits no palette color")
    return Object(name, PALETTE_NAMES[main], dot_name, nearest_cell(center[0] + offset[0], center[1] + offset[1]))


def nearest_cell(cx: float, cy: float) -> str:
    centers = np.array(CELL_CENTERS)
    return cell_at(int(np.abs(centers - cy).argmin()), int(np.abs(centers - cx).argmin()))


def _template(shape: str, p: Placement, h: int, w: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of an h x w crop by the ideal shape, 4x supersampled."""
    k = 4
    y = ((np.arange(h * k) + 0.5) / k)[:, None]
    x = ((np.arange(w * k) + 0.5) / k)[None, :]
    return shape_mask(shape, p, x, y).reshape(h, k, w, k).mean(axis=(1, 3))


def read_shape(filled: np.ndarray, solid: np.ndarray, cover: np.ndarray) -> tuple[str, Placement] | Failure:
    """The shape and its box from a component. ``solid`` is its half-coverage mask (for the bounding box's
    size and aspect), ``cover`` its soft coverage. Each ideal shape is fitted by moments — its side from the
    area, its box center from the centroid — and compared by soft IoU; the best fit wins."""
    solid = fill_holes(solid & filled)  # hole filling keeps the dot inside the shape
    if not solid.any():
        return Failure("no solid pixels")
    ys, xs = np.nonzero(solid)
    h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    if not (SIDE_RANGE[0] <= max(h, w) <= SIDE_RANGE[1]) or max(h, w) > MAX_ASPECT * min(h, w):
        return Failure(f"a {w}x{h} box is not an object's size (side {SIDE_RANGE[0]}-{SIDE_RANGE[1]}, square)")
    fits = fit_shapes(np.where(erode(solid), 1.0, cover))  # the dot and inner blends count as the shape
    ious = {name: iou for name, (iou, _) in fits.items()}
    best = max(ious, key=ious.get)
    if ious[best] < MIN_IOU:
        return Failure(f"fits no shape (best: {best}, IoU {ious[best]:.2f})")
    return best, fits[best][1]


def fit_shapes(cover: np.ndarray) -> dict[str, tuple[float, Placement]]:
    """For each ideal shape: (soft IoU with the coverage map, the fitted box)."""
    area = float(cover.sum())
    gy, gx = np.indices(cover.shape) + 0.5  # pixel centers
    my, mx = float((gy * cover).sum() / area), float((gx * cover).sum() / area)
    fits = {}
    for name in SHAPES:
        side = float(np.sqrt(area / AREA_FACTOR[name]))
        box = Placement(mx, my - CENTROID_BELOW_CENTER.get(name, 0.0) * side, side)
        t = _template(name, box, *cover.shape)
        fits[name] = float(np.minimum(t, cover).sum() / np.maximum(t, cover).sum()), box
    return fits


def read_dot(
    rgb: np.ndarray, other: np.ndarray, filled: np.ndarray, center: tuple[float, float]
) -> tuple[str | None, np.ndarray] | Failure:
    """The dot: the enclosed blob of pure pixels of another palette color. Tiny blobs are edge blends; a blob
    that is not enclosed is a second object stuck to this one."""
    labels, n = label(other)
    enclosed = []
    for k in range(1, n + 1):
        blob = labels == k
        size = int(blob.sum())
        if size < SPECK:
            continue
        ring = dilate(blob) & ~blob
        if (ring & filled).sum() < ENCLOSED * ring.sum():
            return Failure("it touches a blob of another color")
        enclosed.append((size, blob))
    if not enclosed:
        return None, np.zeros_like(other)
    if len(enclosed) > 1:
        return Failure(f"{len(enclosed)} inner blobs; a dot is one")
    size, blob = enclosed[0]
    ys, xs = np.nonzero(blob)
    # Pixel i covers [i, i + 1): its center is i + 0.5.
    off = float(np.hypot(xs.mean() + 0.5 - center[0], ys.mean() + 0.5 - center[1]))
    if not (DOT_AREA[0] <= size <= DOT_AREA[1]) or off > DOT_OFFSET:
        return Failure(f"an inner blob of {size} px, {off:.1f} px off center, is not a dot")
    k, _ = nearest_color(rgb[blob].mean(0))
    return PALETTE_NAMES[int(k)], blob


# -- scoring cases -----------------------------------------------------------------------------------------------


class Verdict(NamedTuple):
    passed: bool
    reason: str
    details: dict


def normalize(text: str) -> str:
    """Answers compare after lowercasing and stripping a final period (and surrounding whitespace)."""
    return text.strip().lower().removesuffix(".").strip()


def check(case: Case, output, input_images=None) -> Verdict:
    """Score one output: an image for t2i / edit / in-context cases, a string for understanding and reflection.
    ``input_images``, when given, must read as the case's input scenes (a guard against mixed-up inputs)."""
    if case.task in TEXT_TASKS:
        if not isinstance(output, str):
            raise TypeError(f"{case.task} cases are answered with text, got {type(output).__name__}")
        return _check_reflection(case, output) if case.task == "reflection" else _check_answer(case, output)
    for k, (img, want) in enumerate(zip(input_images or (), case.inputs)):
        got = read(img)
        if got != want:
            raise ValueError(f"input image {k + 1} of {case.name} shows {got}, not the case's {want.caption()}")
    scene = read(output)
    if isinstance(scene, Failure):
        details = {"read": None}
        if case.task == "ic":
            details |= {"subject_consistency": False, "arrangement": False}
        if case.task == "edit":
            details |= {"change_made": False, "rest_kept": False}
        return Verdict(False, f"unreadable: {scene.reason}", details | {"wrong": ["unreadable"]})
    passed, reason = case.target.check(scene)
    details = {"read": scene.caption(), "wrong": case.target.wrong(scene)}
    if case.task == "edit":
        details |= edit_parts(case.inputs[0], case.target.scene(), scene)
    if case.task == "ic":
        missing = [
            case.target.patterns[i] for i in case.target.subjects if not _appears(case.target.patterns[i], scene)
        ]
        details |= {"subject_consistency": not missing, "arrangement": passed}
        if missing:
            reason = (
                f"not kept from the inputs: {', '.join(phrase(p.color, p.shape, p.dot) for p in missing)}; {reason}"
            )
        passed = passed and not missing
    return Verdict(passed, reason, details)


def _appears(p: Pattern, scene: Scene) -> bool:
    """Subject consistency: an object of the subject's shape, color and dot is in the output (anywhere)."""
    return any(o.look == (p.shape, p.color, p.dot) for o in scene.objects)


def edit_parts(before: Scene, after: Scene, got: Scene) -> dict:
    """Whether the asked change was made, and whether everything else was kept (objects and background)."""
    new, gone = set(after.objects) - set(before.objects), set(before.objects) - set(after.objects)
    kept, have = set(before.objects) & set(after.objects), set(got.objects)
    bg_asked = after.background != before.background
    change_made = new <= have and not gone & have and (not bg_asked or got.background == after.background)
    rest_kept = (
        kept <= have and not (have - set(after.objects) - gone) and (bg_asked or got.background == before.background)
    )
    return {"change_made": change_made, "rest_kept": rest_kept}


def _check_answer(case: Case, answer: str) -> Verdict:
    ok = normalize(answer) == normalize(case.answer)
    return Verdict(ok, "ok" if ok else f"answered {answer!r}, expected {case.answer!r}", {"answer": answer})


def verdict_of(text: str) -> str | None:
    """``"match"``, ``"mismatch"`` or None (not a reflection answer)."""
    t = normalize(text)
    if t == normalize(MATCHES):
        return "match"
    return "mismatch" if t.startswith(MISMATCH.split(":")[0] + ":") else None


def _check_reflection(case: Case, answer: str) -> Verdict:
    """Passes on the right verdict; ``details`` also says whether the answer is exact and whether its fix (one
    editing instruction after the problem) repairs the image."""
    want, got = verdict_of(case.answer), verdict_of(answer)
    details = {"answer": answer, "exact": normalize(answer) == normalize(case.answer), "fix_repairs": None}
    if got == "mismatch":
        edit = Edit.parse(normalize(answer).rsplit(". ", 1)[-1])
        try:
            details["fix_repairs"] = edit is not None and case.target.check(edit.apply(case.inputs[0]))[0]
        except InvalidScene:
            details["fix_repairs"] = False
    reason = "ok" if got == want else f"verdict {got or 'unreadable'}, expected {want}"
    return Verdict(got == want, reason, details)
