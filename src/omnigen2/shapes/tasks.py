"""Shapes World cases for every task and category of the contract's prompt grammar.

A :class:`Case` is a pure function of ``(task, category, seed)``: the prompt, the input scenes (rendered on
demand, with jitter drawn from the seed) and what a correct answer is — a :class:`Target` for image tasks
(the objects an output must show, the relations between them and the background), an exact string for
understanding and reflection. Every target can sample a canonical scene that satisfies it, for training.

Seeds are split once and for all by a hash (:func:`split_of`): about one in eight is an evaluation seed.
Training data is only ever made from training seeds (``make_case(..., split="train")`` refuses the others),
so ShapesBench cases never appear in training data *as cases*. The grammar itself is small, though: a short
prompt such as "a red square" occurs under both splits with different jitter.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

from .render import render
from .world import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    DEFAULT_BACKGROUND,
    NUMBERS,
    RELATIONS,
    SAME_ROW,
    SHAPES,
    InvalidScene,
    Object,
    Scene,
    phrase,
    plural,
    relation_holds,
)

TASKS: dict[str, tuple[str, ...]] = {
    "t2i": ("single", "two", "counting", "colors", "position", "attribute binding"),
    "edit": ("recolor", "remove", "add", "move", "reshape", "background"),
    "ic": ("place", "relate", "row", "into scene"),
    "understanding": ("caption", "count", "color", "position"),
    "reflection": ("match", "color", "shape", "missing", "extra", "position", "background"),
}
IMAGE_TASKS = ("t2i", "edit", "ic")
TEXT_TASKS = ("understanding", "reflection")
COLORS_SHAPE = "square"  # "colors": the shape is fixed and only the color varies, as the contract says
REFLECT_QUESTION = 'does the image match the instruction "{instruction}"?'
MATCHES = "the image matches the instruction."
MISMATCH = "the image does not match the instruction: {problem}. {fix}"
EVAL_EVERY = 8  # one seed in EVAL_EVERY is held out for evaluation

# -- seeds -------------------------------------------------------------------------------------------------------


def stable_hash(*parts) -> int:
    """A stable 64-bit hash (unlike ``hash()``, the same in every process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_of(seed: int) -> str:
    """``"eval"`` for held-out seeds (about 1 in 8), ``"train"`` for the rest; fixed forever by a hash."""
    return "eval" if stable_hash("shapes-split", int(seed)) % EVAL_EVERY == 0 else "train"


def seeds(split: str, n: int, start: int = 0) -> list[int]:
    """The first n seeds >= start of a split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return list(itertools.islice((s for s in itertools.count(start) if split_of(s) == split), n))


# -- targets -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """An object a correct output must contain. ``cell=None``: anywhere. ``dot=None``: no dot."""

    shape: str
    color: str
    dot: str | None = None
    cell: str | None = None

    @classmethod
    def of(cls, obj: Object, anywhere: bool = False) -> Pattern:
        return cls(obj.shape, obj.color, obj.dot, None if anywhere else obj.cell)

    def matches(self, obj: Object) -> bool:
        return obj.look == (self.shape, self.color, self.dot) and self.cell in (None, obj.cell)

    def describe(self) -> str:
        return phrase(self.color, self.shape, self.dot) + (f" at the {self.cell}" if self.cell else "")


# What a failed image case got wrong (Target.wrong; "unreadable": the judge could not read the image).
FAILURE_KINDS = ("unreadable", "background", "count", "color", "shape", "dot", "cell", "relation")


def _differences(p: Pattern, o: Object) -> list[str]:
    """The attributes in which object ``o`` differs from pattern ``p``."""
    checks = (("color", p.color == o.color), ("shape", p.shape == o.shape), ("dot", p.dot == o.dot))
    return [name for name, same in checks if not same] + ([] if p.cell in (None, o.cell) else ["cell"])


@dataclass(frozen=True)
class Relation:
    a: int  # index into Target.patterns
    relation: str  # one of RELATIONS, or SAME_ROW
    b: int


@dataclass(frozen=True)
class Target:
    """What a correct output shows: exactly one object per pattern (no others), the relations between the
    objects matched to the patterns, and the background. ``subjects`` lists the patterns that are objects
    taken from input images (in-context), for subject consistency."""

    patterns: tuple[Pattern, ...]
    relations: tuple[Relation, ...] = ()
    background: str = DEFAULT_BACKGROUND
    subjects: tuple[int, ...] = ()

    @classmethod
    def exact(cls, scene: Scene, subjects: tuple[int, ...] = ()) -> Target:
        return cls(tuple(Pattern.of(o) for o in scene.objects), (), scene.background, subjects)

    def scene(self) -> Scene:
        """The one scene an exact target allows."""
        if any(p.cell is None for p in self.patterns) or self.relations:
            raise ValueError("this target allows many scenes; use sample()")
        return Scene(tuple(Object(p.shape, p.color, p.dot, p.cell) for p in self.patterns), self.background)

    def _holds(self, cells) -> bool:
        """Whether every relation holds when pattern i is in cells[i]."""
        return all(relation_holds(r.relation, cells[r.a], cells[r.b]) for r in self.relations)

    def check(self, scene: Scene) -> tuple[bool, str]:
        """(passed, reason)."""
        problems = []
        if scene.background != self.background:
            problems.append(f"the background is {scene.background}, not {self.background}")
        matched = []
        if len(scene.objects) == len(self.patterns):
            perms = itertools.permutations(scene.objects)
            matched = [m for m in perms if all(p.matches(o) for p, o in zip(self.patterns, m))]
        if not matched:
            problems.append(self._diff(scene.objects))
        elif not any(self._holds([o.cell for o in m]) for m in matched):
            objs = matched[0]
            r = next(r for r in self.relations if not relation_holds(r.relation, objs[r.a].cell, objs[r.b].cell))
            a, b = self.patterns[r.a], self.patterns[r.b]
            problems.append(f"the {a.color} {a.shape} is not {r.relation} the {b.color} {b.shape}")
        return (not problems), ("; ".join(problems) or "ok")

    def wrong(self, scene: Scene) -> list[str]:
        """What a scene that fails :meth:`check` gets wrong, as :data:`FAILURE_KINDS` (empty when it passes): the
        background, the number of objects, and the attributes that differ between the patterns and the objects
        paired with them (the pairing that gets the most attributes right; with a wrong number of objects, of as
        many as both have); ``relation`` when every object is right and the arrangement is not."""
        if self.check(scene)[0]:
            return []
        kinds = {"background"} if scene.background != self.background else set()
        objects, patterns = scene.objects, self.patterns
        if len(objects) != len(patterns):
            kinds.add("count")
        k = min(len(objects), len(patterns))
        pairings = (  # (pattern, object) pairs of k of each
            [list(zip(patterns, perm)) for perm in itertools.permutations(objects, k)]
            if len(objects) >= len(patterns)
            else [list(zip(perm, objects)) for perm in itertools.permutations(patterns, k)]
        )
        best = min(pairings, key=lambda pairs: sum(len(_differences(p, o)) for p, o in pairs))
        kinds |= {d for p, o in best for d in _differences(p, o)}
        if not kinds:  # the right objects: the relations are what fails
            kinds.add("relation")
        return [kind for kind in FAILURE_KINDS if kind in kinds]

    def _diff(self, objects: tuple[Object, ...]) -> str:
        left, missing = list(objects), []
        for p in sorted(self.patterns, key=lambda p: p.cell is None):  # placed patterns claim objects first
            hit = next((o for o in left if p.matches(o)), None)
            if hit:
                left.remove(hit)
            else:
                missing.append(p.describe())
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected {', '.join(o.describe() for o in left)}"] if left else []
        return f"{len(objects)} objects for {len(self.patterns)} asked: " + "; ".join(parts)

    def sample(self, rng: random.Random) -> Scene:
        """A canonical scene satisfying the target: free patterns get cells drawn uniformly among the
        arrangements that satisfy every relation."""
        free = [i for i, p in enumerate(self.patterns) if p.cell is None]
        taken = {p.cell for p in self.patterns if p.cell is not None}
        options = []
        for chosen in itertools.permutations([c for c in CELLS if c not in taken], len(free)):
            cells = [p.cell for p in self.patterns]
            for i, c in zip(free, chosen):
                cells[i] = c
            if self._holds(cells):
                options.append(cells)
        if not options:
            raise InvalidScene(f"no scene satisfies {self}")
        cells = rng.choice(options)
        return Scene(tuple(Object(p.shape, p.color, p.dot, c) for p, c in zip(self.patterns, cells)), self.background)


# -- edits -------------------------------------------------------------------------------------------------------

EDIT_TEMPLATES = {
    "recolor": "make the {color} {shape} {value}",
    "remove": "remove the {color} {shape}",
    "add": "add a {color} {shape} at the {value}",
    "move": "move the {color} {shape} to the {value}",
    "reshape": "turn the {color} {shape} into a {value}",
    "background": "change the background to {value}",
}
# How a reflection answer words the problem that each kind of edit fixes ("{problem}. {fix}").
PROBLEM_TEMPLATES = {
    "recolor": "the {color} {shape} should be {value}",
    "remove": "there should be no {color} {shape}",
    "add": "the {color} {shape} is missing",
    "move": "the {color} {shape} should be at the {value}",
    "reshape": "the {color} {shape} should be a {value}",
    "background": "the background should be {value}",
}
_VALUES = {"recolor": COLORS, "add": CELLS, "move": CELLS, "reshape": SHAPES, "background": BACKGROUNDS}


def _alt(names) -> str:
    return "(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + ")"


_EDIT_RES = {
    kind: re.compile(
        re.escape(t)
        .replace(r"\{color\}", f"(?P<color>{_alt(COLORS)[1:-1]})")
        .replace(r"\{shape\}", f"(?P<shape>{_alt(SHAPES)[1:-1]})")
        .replace(r"\{value\}", f"(?P<value>{_alt(_VALUES.get(kind, ()))[1:-1]})")
    )
    for kind, t in EDIT_TEMPLATES.items()
}


@dataclass(frozen=True)
class Edit:
    """One editing instruction. ``color``/``shape`` name the object edited (for ``add``: the new one);
    ``value`` is the new color, cell, shape or background."""

    kind: str
    color: str | None = None
    shape: str | None = None
    value: str | None = None

    def prompt(self) -> str:
        return EDIT_TEMPLATES[self.kind].format(color=self.color, shape=self.shape, value=self.value)

    def problem(self) -> str:
        """The problem this edit repairs, as a reflection answer words it ("the red square is missing")."""
        return PROBLEM_TEMPLATES[self.kind].format(color=self.color, shape=self.shape, value=self.value)

    @classmethod
    def parse(cls, text: str) -> Edit | None:
        text = text.strip().lower().removesuffix(".")
        for kind, pattern in _EDIT_RES.items():
            m = pattern.fullmatch(text)
            if m:
                return cls(kind, **m.groupdict())
        return None

    def apply(self, scene: Scene) -> Scene:
        """The edited scene; InvalidScene if the edit does not apply (no such object, cell taken, ...)."""
        if self.kind == "background":
            return Scene(scene.objects, self.value)
        if self.kind == "add":
            return scene.with_object(Object(self.shape, self.color, None, self.value))
        found = scene.find(self.color, self.shape)
        if len(found) != 1:
            raise InvalidScene(f"{len(found)} {self.color} {plural(self.shape)} in the scene; an edit needs one")
        obj, rest = found[0], scene.without(found[0])
        if self.kind == "remove":
            return rest
        change = {"recolor": "color", "move": "cell", "reshape": "shape"}[self.kind]
        return rest.with_object(obj.replace(**{change: self.value}))


# -- cases -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark / training case. Image tasks have a ``target``; text tasks an exact ``answer``.
    Reflection cases keep the judged ``instruction`` and its ``target`` (to check a proposed fix)."""

    task: str
    category: str
    seed: int
    prompt: str
    inputs: tuple[Scene, ...] = ()
    target: Target | None = None
    answer: str | None = None
    instruction: str | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.category}/{self.seed}"

    def input_images(self) -> list[PIL.Image.Image]:
        """The input scenes rendered with jitter drawn from the case's seed (the same images every time)."""
        return [render(s, np.random.default_rng(stable_hash(self.name, "input", k))) for k, s in enumerate(self.inputs)]

    def canonical(self) -> Scene:
        """A scene that answers an image case correctly (the training target)."""
        if self.target is None:
            raise ValueError(f"{self.name} is a text case; its answer is {self.answer!r}")
        return self.target.sample(random.Random(stable_hash(self.name, "target")))

    def render_target(self) -> PIL.Image.Image:
        return render(self.canonical(), np.random.default_rng(stable_hash(self.name, "target-render")))


def _kinds(rng: random.Random, k: int, taken=()) -> list[tuple[str, str]]:
    """k distinct (color, shape) pairs not in ``taken``: prompts name objects by kind, so kinds stay unique."""
    pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(taken)]
    return rng.sample(pool, k)


def _dot(rng: random.Random, color: str, p: float) -> str | None:
    return rng.choice([c for c in COLORS if c != color]) if rng.random() < p else None


def _scene(rng: random.Random, k: int, background: str | None = None, dots: float = 0.3, taken=()) -> Scene:
    """k objects of distinct kinds in random cells."""
    cells = rng.sample(CELLS, k)
    objs = [Object(s, c, _dot(rng, c, dots), cell) for (c, s), cell in zip(_kinds(rng, k, taken), cells)]
    return Scene(tuple(objs), background or rng.choice(list(BACKGROUNDS)))


# text-to-image ------------------------------------------------------------------------------------------------


def _t2i_single(rng):
    color, shape = _kinds(rng, 1)[0]
    dot = _dot(rng, color, 0.5)
    cell = rng.choice(CELLS) if rng.random() < 0.5 else None
    bg = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else None
    prompt = phrase(color, shape, dot) + (f" at the {cell}" if cell else "") + (f" on a {bg} background" if bg else "")
    return prompt, Target((Pattern(shape, color, dot, cell),), background=bg or DEFAULT_BACKGROUND)


def _t2i_two(rng):
    (c1, s1), (c2, s2) = _kinds(rng, 2)
    return f"a {c1} {s1} and a {c2} {s2}", Target((Pattern(s1, c1), Pattern(s2, c2)))


def _t2i_counting(rng):
    n, color, shape = rng.randint(2, 4), rng.choice(list(COLORS)), rng.choice(SHAPES)
    return f"{NUMBERS[n]} {color} {plural(shape)}", Target((Pattern(shape, color),) * n)


def _t2i_colors(rng):
    color = rng.choice(list(COLORS))
    return f"a {color} {COLORS_SHAPE}", Target((Pattern(COLORS_SHAPE, color),))


def _t2i_position(rng):
    (c1, s1), (c2, s2) = _kinds(rng, 2)
    rel = rng.choice(RELATIONS)
    return f"a {c1} {s1} {rel} a {c2} {s2}", Target((Pattern(s1, c1), Pattern(s2, c2)), (Relation(0, rel, 1),))


def _t2i_binding(rng):
    (c1, s1), (c2, s2) = _kinds(rng, 2)
    dot = _dot(rng, c1, 1.0)
    return f"a {c1} {s1} with a {dot} dot and a {c2} {s2}", Target((Pattern(s1, c1, dot), Pattern(s2, c2)))


# editing ------------------------------------------------------------------------------------------------------


def _edit(rng, kind: str, scene: Scene) -> Edit:
    if kind == "background":
        return Edit(kind, value=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    kinds = {o.kind for o in scene.objects}
    if kind == "add":
        (color, shape), cell = _kinds(rng, 1, kinds)[0], rng.choice(scene.free_cells())
        return Edit(kind, color, shape, cell)
    obj = rng.choice(scene.objects)
    if kind == "recolor":
        options = [c for c in COLORS if c not in (obj.color, obj.dot) and (c, obj.shape) not in kinds]
    elif kind == "reshape":
        options = [s for s in SHAPES if s != obj.shape and (obj.color, s) not in kinds]
    elif kind == "move":
        options = scene.free_cells()
    else:  # remove
        options = [None]
    return Edit(kind, obj.color, obj.shape, rng.choice(options))


def _edit_case(kind: str):
    def make(rng):
        scene = _scene(rng, rng.randint(1, 3))
        edit = _edit(rng, kind, scene)
        return edit.prompt(), (scene,), Target.exact(edit.apply(scene))

    return make


# in-context ---------------------------------------------------------------------------------------------------


def _subjects(rng, k: int, taken=()) -> list[Object]:
    """k objects of distinct kinds, each alone in a random cell of its own subject image."""
    return [Object(s, c, _dot(rng, c, 0.3), rng.choice(CELLS)) for c, s in _kinds(rng, k, taken)]


def _alone(obj: Object) -> Scene:
    return Scene((obj,), DEFAULT_BACKGROUND)


def _ic_place(rng):
    (subj,) = _subjects(rng, 1)
    cell = rng.choice([c for c in CELLS if c != subj.cell])
    target = Target.exact(Scene((subj.replace(cell=cell),)), subjects=(0,))
    return f"put the object from image 1 at the {cell}", (_alone(subj),), target


def _ic_relate(rng):
    subjects, rel = _subjects(rng, 2), rng.choice(RELATIONS)
    patterns = tuple(Pattern.of(o, anywhere=True) for o in subjects)
    target = Target(patterns, (Relation(0, rel, 1),), subjects=(0, 1))
    return f"put the object from image 1 {rel} the object from image 2", tuple(map(_alone, subjects)), target


def _ic_row(rng):
    subjects = _subjects(rng, 3)
    patterns = tuple(Pattern.of(o, anywhere=True) for o in subjects)
    rels = (Relation(0, "left of", 1), Relation(1, "left of", 2), Relation(0, SAME_ROW, 1), Relation(1, SAME_ROW, 2))
    prompt = "put the objects from image 1, image 2 and image 3 in a row from left to right"
    return prompt, tuple(map(_alone, subjects)), Target(patterns, rels, subjects=(0, 1, 2))


def _ic_into_scene(rng):
    scene = _scene(rng, rng.randint(1, 3))
    (subj,) = _subjects(rng, 1, {o.kind for o in scene.objects})
    cell = rng.choice(scene.free_cells())
    placed = subj.replace(cell=cell)
    after = scene.with_object(placed)
    target = Target.exact(after, subjects=(after.objects.index(placed),))
    return f"add the object from image 1 to image 2 at the {cell}", (_alone(subj), scene), target


# understanding ------------------------------------------------------------------------------------------------


def _u_caption(rng, dots: float = 0.3):
    scene = _scene(rng, rng.randint(1, 4), dots=dots)
    return "describe the image.", scene, scene.caption()


def _u_count(rng):
    shape, n = rng.choice(SHAPES), rng.randint(0, 4)
    others = rng.randint(0 if n else 1, 2)
    cells = rng.sample(CELLS, n + others)
    objs = [Object(shape, c, _dot(rng, c, 0.3), cell) for c, cell in zip(rng.choices(list(COLORS), k=n), cells)]
    for cell in cells[n:]:
        color = rng.choice(list(COLORS))
        objs.append(Object(rng.choice([s for s in SHAPES if s != shape]), color, _dot(rng, color, 0.3), cell))
    return f"how many {plural(shape)} are there?", Scene(tuple(objs), rng.choice(list(BACKGROUNDS))), NUMBERS[n]


def _u_color(rng):
    scene = _scene(rng, rng.randint(1, 3))
    obj = rng.choice(scene.objects)
    # Only asked when exactly one object has that shape: drop the others of its shape.
    scene = Scene(tuple(o for o in scene.objects if o.shape != obj.shape or o == obj), scene.background)
    return f"what color is the {obj.shape}?", scene, obj.color


def _u_position(rng):
    scene = _scene(rng, rng.randint(1, 3))
    obj = rng.choice(scene.objects)
    return f"where is the {obj.color} {obj.shape}?", scene, obj.cell


# reflection ---------------------------------------------------------------------------------------------------


def _problem(wrong: Scene, fix: Edit) -> tuple[Scene, str, Edit]:
    return wrong, fix.problem(), fix


def _corrupt(rng, category: str, scene: Scene, target: Target) -> tuple[Scene, str, Edit] | None:
    """(wrong scene, problem, fixing edit), or None when this scene cannot show this problem."""
    kinds = {o.kind for o in scene.objects}
    obj = rng.choice(scene.objects) if scene.objects else None
    if category == "background":
        bg = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        return _problem(Scene(scene.objects, bg), Edit("background", value=scene.background))
    if category == "extra":
        (color, shape), cell = _kinds(rng, 1, kinds)[0], rng.choice(scene.free_cells())
        return _problem(scene.with_object(Object(shape, color, None, cell)), Edit("remove", color, shape))
    if obj is None or len(scene.find(*obj.kind)) != 1:
        return None  # the problem names the object: its kind must be unique
    if category == "color":
        options = [c for c in COLORS if c not in (obj.color, obj.dot) and (c, obj.shape) not in kinds]
        if not options:
            return None
        c = rng.choice(options)
        return _problem(scene.without(obj).with_object(obj.replace(color=c)), Edit("recolor", c, obj.shape, obj.color))
    if category == "shape":
        options = [s for s in SHAPES if s != obj.shape and (obj.color, s) not in kinds]
        if not options:
            return None
        s = rng.choice(options)
        return _problem(scene.without(obj).with_object(obj.replace(shape=s)), Edit("reshape", obj.color, s, obj.shape))
    if category == "missing" and obj.dot is None:  # "add" cannot add a dot
        return _problem(scene.without(obj), Edit("add", obj.color, obj.shape, obj.cell))
    if category == "position":
        wrong = scene.without(obj).with_object(obj.replace(cell=rng.choice(scene.free_cells())))
        if target.check(wrong)[0]:
            return None
        return _problem(wrong, Edit("move", *obj.kind, obj.cell))
    return None


def _reflection(category: str) -> Callable:
    def make(rng, split: str):
        for _ in range(100):  # some base cases cannot show a problem (e.g. "missing" of a dotted object)
            # The judged instruction is a text-to-image case of the same split, so that no evaluation
            # target image reaches training data through a reflection case.
            base_seed = seeds(split, 1, start=rng.randrange(2**31))[0]
            base = make_case("t2i", rng.choice(TASKS["t2i"]), base_seed)
            scene = base.canonical()
            if category == "match":
                return base.prompt, scene, MATCHES, base
            found = _corrupt(rng, category, scene, base.target)
            if found is None:
                continue
            wrong, problem, fix = found
            # The answer must be right: the image is wrong, and the fix repairs it.
            if not base.target.check(wrong)[0] and base.target.check(fix.apply(wrong))[0]:
                return base.prompt, wrong, MISMATCH.format(problem=problem, fix=fix.prompt()), base
        raise RuntimeError(f"no reflection case for {category}")

    return make


_T2I = {
    "single": _t2i_single,
    "two": _t2i_two,
    "counting": _t2i_counting,
    "colors": _t2i_colors,
    "position": _t2i_position,
    "attribute binding": _t2i_binding,
}
_EDIT = {kind: _edit_case(kind) for kind in TASKS["edit"]}
_IC = {"place": _ic_place, "relate": _ic_relate, "row": _ic_row, "into scene": _ic_into_scene}
_UNDERSTANDING = {"caption": _u_caption, "count": _u_count, "color": _u_color, "position": _u_position}
_REFLECTION = {c: _reflection(c) for c in TASKS["reflection"]}


def make_case(task: str, category: str, seed: int, split: str | None = None) -> Case:
    """The case ``(task, category, seed)``; with ``split``, refuse a seed of the other split."""
    if task not in TASKS or category not in TASKS[task]:
        known = "; ".join(f"{t}: {', '.join(c)}" for t, c in TASKS.items())
        raise ValueError(f"unknown task/category {task!r}/{category!r} (known: {known})")
    if split is not None and split_of(seed) != split:
        raise ValueError(f"seed {seed} is a {split_of(seed)} seed, not a {split} seed")
    rng = random.Random(stable_hash("shapes-case", task, category, seed))
    if task == "t2i":
        prompt, target = _T2I[category](rng)
        return Case(task, category, seed, prompt, (), target)
    if task in ("edit", "ic"):
        prompt, inputs, target = (_EDIT if task == "edit" else _IC)[category](rng)
        return Case(task, category, seed, prompt, inputs, target)
    if task == "understanding":
        question, scene, answer = _UNDERSTANDING[category](rng)
        return Case(task, category, seed, question, (scene,), answer=answer)
    instruction, scene, answer, base = _REFLECTION[category](rng, split_of(seed))
    question = REFLECT_QUESTION.format(instruction=instruction)
    return Case(task, category, seed, question, (scene,), base.target, answer, instruction)


def dotted_captions(n: int, start: int = 0, dots: float = 0.5) -> list[tuple[list[PIL.Image.Image], str, str]]:
    """n training examples (images, question, answer) of the caption question on training-split scenes whose
    objects carry a dot at the odds ``dots`` (the benchmark's captions: 3 in 10), for teaching the answering
    adapter to read dots (cell_probe). Not a benchmark category: seeds of the training split only."""
    out = []
    for seed in seeds("train", n, start):
        question, scene, answer = _u_caption(random.Random(stable_hash("dotted-caption", seed)), dots=dots)
        image = render(scene, np.random.default_rng(stable_hash("dotted-caption", seed, "render")))
        out.append(([image], question, answer))
    return out


def category_counts(task: str, n: int) -> dict[str, int]:
    """n cases of a task spread evenly over its categories (the first ones get the remainder)."""
    cats = TASKS[task]
    return {c: n // len(cats) + (i < n % len(cats)) for i, c in enumerate(cats)}


def cases(task: str, n: int, split: str = "eval", start: int = 0) -> list[Case]:
    """n cases of a task from one split, spread over its categories. ``split="eval"`` is ShapesBench."""
    return [
        make_case(task, cat, s, split) for cat, k in category_counts(task, n).items() for s in seeds(split, k, start)
    ]


_SINGULAR = {plural(s): s for s in SHAPES}
_QUESTIONS = {
    "count": re.compile(f"how many {_alt(_SINGULAR)} are there\\?"),
    "color": re.compile(f"what color is the {_alt(SHAPES)}\\?"),
    "position": re.compile(f"where is the {_alt(COLORS)} {_alt(SHAPES)}\\?"),
}


def answer(question: str, scene: Scene) -> str:
    """The canonical answer to an understanding question about a scene."""
    q = question.strip().lower()
    if q == "describe the image.":
        return scene.caption()
    if m := _QUESTIONS["count"].fullmatch(q):
        n = scene.count(_SINGULAR[m[1]])
        return NUMBERS[n] if n < len(NUMBERS) else str(n)
    if m := _QUESTIONS["color"].fullmatch(q):
        found = [o for o in scene.objects if o.shape == m[1]]
        if len(found) != 1:
            raise ValueError(f"{question!r} needs exactly one {m[1]}; the scene has {len(found)}")
        return found[0].color
    if m := _QUESTIONS["position"].fullmatch(q):
        found = scene.find(m[1], m[2])
        if len(found) != 1:
            raise ValueError(f"{question!r} needs exactly one {m[1]} {m[2]}; the scene has {len(found)}")
        return found[0].cell
    raise ValueError(f"not an understanding question: {question!r}")
