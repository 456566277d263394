"""How often the README's examples come out right on the bundled model, as a newcomer would run them.

For each candidate text-to-image prompt and each seed S this does what
``omnigen2 generate PROMPT -o out.png --seed S`` does (the CLI's pipeline call and defaults, the PNG written and
read back), then what ``omnigen2 generate EDIT -i out.png -o edited.png --seed S`` does with that output, and
scores both with the Shapes judge (docs/SHAPES.md):

- the drawing passes when the judge reads a scene that satisfies the prompt (as ShapesBench's t2i check);
- the edit is scored against the scene the judge read from *its own input* with the edit applied, so an edit
  is right when it made the asked change to whatever the drawing showed and kept the rest; when the drawing is
  unreadable, or the edit does not apply to what it shows (no such object), the edit counts as wrong;
- "both" counts the seeds on which the drawing and its edit are both right: what the README's two commands
  give a newcomer.

    OMP_NUM_THREADS=1 python experiments/readme_examples.py --seeds 20
    python experiments/readme_examples.py --t2i "a red square" --edit "change the background to sky" --save out/

The prompts must be in the Shapes World grammar (shared/docs/SHAPES_WORLD.md): a prompt this script cannot
turn into a target is an error, not a silent pass.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

from omnigen2 import OmniGen2Pipeline
from omnigen2.images import load_image
from omnigen2.shapes import judge
from omnigen2.shapes.tasks import Case, Edit, Pattern, Relation, Target
from omnigen2.shapes.world import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    DEFAULT_BACKGROUND,
    NUMBERS,
    PLURALS,
    RELATIONS,
    SHAPES,
    InvalidScene,
)

# Candidates: text-to-image prompts, each with the edits a newcomer might apply to its output. The first is the
# README's pair; the README's old pair (a two-object prompt and a recolouring) comes second.
CANDIDATES: dict[str, list[str]] = {
    "a red square at the top left": ["move the red square to the bottom right", "change the background to sky"],
    "a red circle above a blue square": ["make the red circle green", "change the background to sky"],
    "a red square": ["change the background to sky", "remove the red square", "make the red square green"],
    "a green circle": ["change the background to beige", "move the green circle to the top left"],
    "a green circle at the top left": [
        "move the green circle to the bottom right",
        "add a red square at the bottom right",
    ],
    "a black cross": ["change the background to mint", "turn the black cross into a square"],
    "a red triangle": ["change the background to sky", "add a blue square at the top left"],
    "two red squares": ["change the background to sky"],
    "three green circles": ["change the background to beige"],
    "a red square on a sky background": ["change the background to gray"],
    "a red circle and a blue square": ["remove the blue square"],
}

_C = "|".join(sorted(COLORS, key=len, reverse=True))
_S = "|".join(SHAPES)
_CELL = "|".join(sorted(CELLS, key=len, reverse=True))
_BG = "|".join(BACKGROUNDS)
_REL = "|".join(RELATIONS)
_PL = "|".join(PLURALS.values())
_T2I = [
    ("binding", rf"a ({_C}) ({_S}) with a ({_C}) dot and a ({_C}) ({_S})"),
    ("two", rf"a ({_C}) ({_S}) and a ({_C}) ({_S})"),
    ("position", rf"a ({_C}) ({_S}) ({_REL}) a ({_C}) ({_S})"),
    ("counting", rf"({'|'.join(NUMBERS[2:])}) ({_C}) ({_PL})"),
    ("single", rf"a ({_C}) ({_S})(?: with a ({_C}) dot)?(?: at the ({_CELL}))?(?: on a ({_BG}) background)?"),
]


def t2i_case(prompt: str) -> Case:
    """The ShapesBench case a text-to-image prompt of the grammar stands for (its target, as tasks.py builds it)."""
    text = prompt.strip().lower().removesuffix(".")
    for category, pattern in _T2I:
        m = re.fullmatch(pattern, text)
        if not m:
            continue
        g = m.groups()
        if category == "binding":
            target = Target((Pattern(g[1], g[0], g[2]), Pattern(g[4], g[3])))
        elif category == "two":
            target = Target((Pattern(g[1], g[0]), Pattern(g[3], g[2])))
        elif category == "position":
            target = Target((Pattern(g[1], g[0]), Pattern(g[4], g[3])), (Relation(0, g[2], 1),))
        elif category == "counting":
            shape = next(s for s, p in PLURALS.items() if p == g[2])
            target = Target((Pattern(shape, g[1]),) * NUMBERS.index(g[0]))
        else:
            target = Target((Pattern(g[1], g[0], g[2], g[3]),), background=g[4] or DEFAULT_BACKGROUND)
        return Case("t2i", category, 0, prompt, target=target)
    raise ValueError(f"{prompt!r} is not a text-to-image prompt of the Shapes World grammar")


def edit_case(instruction: str, before) -> Case | str:
    """The edit case for an input the judge read as ``before``, or why the edit cannot apply to it."""
    edit = Edit.parse(instruction)
    if edit is None:
        raise ValueError(f"{instruction!r} is not an editing instruction of the Shapes World grammar")
    if isinstance(before, judge.Failure):
        return f"input unreadable ({before.reason})"
    try:
        after = edit.apply(before)
    except InvalidScene as e:
        return f"does not apply to the input ({before.caption()}): {e}"
    return Case("edit", edit.kind, 0, instruction, inputs=(before,), target=Target.exact(after))


def generate(pipe, prompt: str, seed: int, input_path: Path | None, out_path: Path):
    """What ``omnigen2 generate PROMPT [-i INPUT] -o OUT --seed SEED`` does with its default options
    (cli.cmd_generate): the same pipeline call, the PNG written and, for the next command, read back."""
    out = pipe(
        prompt=prompt,
        input_images=[load_image(input_path)] if input_path else None,
        cfg_range=(0.0, 1.0),
        num_images_per_prompt=1,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        max_pixels=1024 * 1024,
        max_input_image_side_length=1024,
        max_sequence_length=1024,
    )
    out.images[0].save(out_path)
    return load_image(out_path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:shapes")
    p.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1")
    p.add_argument("--t2i", action="append", help="a text-to-image prompt (repeat); default: the candidates")
    p.add_argument("--edit", action="append", help="an edit of every --t2i output (repeat)")
    p.add_argument("--save", type=Path, help="keep the images here (PROMPT_sS.png, PROMPT_sS_EDIT.png)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.edit and not args.t2i:
        p.error("--edit applies to the outputs of --t2i prompts; give at least one --t2i")
    torch.set_num_threads(args.threads)
    candidates = {t: args.edit or [] for t in args.t2i} if args.t2i else CANDIDATES
    cases = {t: t2i_case(t) for t in candidates}  # refuse a prompt outside the grammar before loading the model
    for edits in candidates.values():
        for e in edits:
            if Edit.parse(e) is None:
                raise ValueError(f"{e!r} is not an editing instruction of the Shapes World grammar")

    pipe = OmniGen2Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    tmp = tempfile.TemporaryDirectory()
    folder = args.save or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for prompt, edits in candidates.items():
        t2i_ok, edit_ok, both = 0, {e: 0 for e in edits}, {e: 0 for e in edits}
        for seed in range(args.seeds):
            drawn_path = folder / f"{slug(prompt)}_s{seed}.png"
            drawn = generate(pipe, prompt, seed, None, drawn_path)
            verdict = judge.check(cases[prompt], drawn)
            t2i_ok += verdict.passed
            print(f"  seed {seed:2d} t2i  {'PASS' if verdict.passed else 'fail'}  {verdict.reason}")
            before = judge.read(drawn)
            for e in edits:
                edited = generate(pipe, e, seed, drawn_path, folder / f"{slug(prompt)}_s{seed}_{slug(e)}.png")
                case = edit_case(e, before)
                v = judge.check(case, edited) if isinstance(case, Case) else judge.Verdict(False, case, {})
                edit_ok[e] += v.passed
                both[e] += v.passed and verdict.passed
                print(f"  seed {seed:2d} edit {'PASS' if v.passed else 'fail'}  {e!r}: {v.reason}")
        print(f"{prompt!r}: right on {t2i_ok} of {args.seeds} seeds")
        for e in edits:
            print(
                f"    then {e!r}: edit right on {edit_ok[e]} of {args.seeds}, both right on {both[e]} of {args.seeds}"
            )
    print(f"{time.perf_counter() - t0:.0f} s on {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
