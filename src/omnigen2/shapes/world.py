"""The Shapes World scene model, exactly as docs/SHAPES_WORLD.md (in the shared docs) defines it.

A :class:`Scene` is a background and up to nine :class:`Object` s, one per cell of a 3 x 3 grid. Everything
else (renderer, task generators, judge) is written against these types, so the palettes, cell names and
relations live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CANVAS = 64  # output side in pixels
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down, for anti-aliased edges
BOX = 16  # side of an object's box
DOT_DIAMETER = 6
CELL_CENTERS = (11, 32, 53)  # x and y of the three columns / rows (continuous coordinates, canvas = [0, 64])

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (235, 235, 235),
    "beige": (240, 225, 190),
    "sky": (200, 225, 250),
    "mint": (205, 240, 205),
}
DEFAULT_BACKGROUND = "gray"  # a prompt that names no background means gray
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 200, 20),
    "purple": (140, 50, 190),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
# Used by in-context "row" targets only; not part of the prompt grammar.
SAME_ROW = "in the same row as"
NUMBERS = ("zero", "one", "two", "three", "four")
# "{shape}s" in the grammar is the English plural: "crosses", not "crosss".
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


class InvalidScene(ValueError):
    """An object or scene breaks a rule of the world (unknown name, shared cell, dot of the object's color)."""


def cell_rc(cell: str) -> tuple[int, int]:
    """(row, column) of a cell, both in 0..2, row 0 at the top."""
    if cell not in CELLS:
        raise InvalidScene(f"unknown cell {cell!r}; cells are {', '.join(CELLS)}")
    return divmod(CELLS.index(cell), 3)


def cell_at(row: int, col: int) -> str:
    return CELLS[3 * row + col]


def cell_center(cell: str) -> tuple[int, int]:
    """(x, y) pixel center of a cell at 64 x 64."""
    row, col = cell_rc(cell)
    return CELL_CENTERS[col], CELL_CENTERS[row]


def relation_holds(relation: str, a: str, b: str) -> bool:
    """Whether ``a <relation> b`` for cells a and b. ``left of`` compares columns only (the row may differ)."""
    (ra, ca), (rb, cb) = cell_rc(a), cell_rc(b)
    checks = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb, SAME_ROW: ra == rb}
    if relation not in checks:
        raise InvalidScene(f"unknown relation {relation!r}")
    return checks[relation]


def plural(shape: str) -> str:
    return PLURALS[shape]


def phrase(color: str, shape: str, dot: str | None = None) -> str:
    """``a red square`` / ``a red square with a yellow dot``."""
    return f"a {color} {shape}" + (f" with a {dot} dot" if dot else "")


@dataclass(frozen=True)
class Object:
    shape: str
    color: str
    dot: str | None = None  # the dot's color, or None
    cell: str = "center"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise InvalidScene(f"unknown shape {self.shape!r}; shapes are {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise InvalidScene(f"unknown color {self.color!r}; colors are {', '.join(COLORS)}")
        if self.dot is not None and self.dot not in COLORS:
            raise InvalidScene(f"unknown dot color {self.dot!r}")
        if self.dot == self.color:
            raise InvalidScene(f"a {self.color} {self.shape} cannot have a {self.dot} dot (same color)")
        cell_rc(self.cell)

    @property
    def kind(self) -> tuple[str, str]:
        """(color, shape): how prompts refer to an object ("the red square")."""
        return self.color, self.shape

    @property
    def look(self) -> tuple[str, str, str | None]:
        """(shape, color, dot): what subject consistency compares."""
        return self.shape, self.color, self.dot

    def phrase(self) -> str:
        return phrase(self.color, self.shape, self.dot)

    def describe(self) -> str:
        """Caption part: ``a red square with a yellow dot at the top left``."""
        return f"{self.phrase()} at the {self.cell}"

    def replace(self, **changes) -> Object:
        return Object(**{**self.__dict__, **changes})


@dataclass(frozen=True)
class Scene:
    """A background and objects in distinct cells. Objects are kept in reading order (row by row, left to
    right), so two scenes with the same objects compare equal whatever order they were listed in."""

    objects: tuple[Object, ...] = field(default_factory=tuple)
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise InvalidScene(f"unknown background {self.background!r}; backgrounds are {', '.join(BACKGROUNDS)}")
        objects = tuple(sorted(self.objects, key=lambda o: CELLS.index(o.cell)))
        cells = [o.cell for o in objects]
        shared = sorted({c for c in cells if cells.count(c) > 1}, key=CELLS.index)
        if shared:
            raise InvalidScene(f"two objects share the {shared[0]} cell")
        object.__setattr__(self, "objects", objects)

    def at(self, cell: str) -> Object | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def find(self, color: str, shape: str) -> list[Object]:
        return [o for o in self.objects if o.kind == (color, shape)]

    def free_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def without(self, obj: Object) -> Scene:
        return Scene(tuple(o for o in self.objects if o != obj), self.background)

    def with_object(self, obj: Object) -> Scene:
        return Scene((*self.objects, obj), self.background)

    def caption(self) -> str:
        """The canonical caption: objects in reading order, joined by ", " and " and " before the last, then
        " on a {bg} background" unless gray. An empty scene (never asked about) reads "nothing"."""
        parts = [o.describe() for o in self.objects]
        text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else (parts[0] if parts else "nothing")
        if self.background != DEFAULT_BACKGROUND:
            text += f" on a {self.background} background"
        return text

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)
