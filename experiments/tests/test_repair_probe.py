"""The repair probe's bookkeeping: an editor that carries out every fix passes every repair, one that hands the
drawing back passes none, and a real pipeline's edits are counted per fix kind."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np

from experiments.repair_probe import Repair, one_edit_repairs, repair_rates
from omnigen2.shapes import judge
from omnigen2.shapes.reflection import diagnose
from omnigen2.shapes.render import render
from omnigen2.shapes.tasks import COLORS, Edit, cases


def _wrong_drawings(n: int = 12) -> list[Repair]:
    """Held-out single-object t2i targets drawn with the object's colour changed: one recolouring repairs each."""
    out, rng = [], random.Random(0)
    for case in cases("t2i", 6 * n, split="eval"):
        if case.category != "single" or len(out) == n:
            continue
        right = case.canonical()
        obj = right.objects[0]
        colors = [c for c in COLORS if c not in (obj.color, obj.dot)]  # a dot never takes its object's colour
        wrong = Edit("recolor", obj.color, obj.shape, rng.choice(colors)).apply(right)
        d = diagnose(case, render(wrong, np.random.default_rng(len(out))))
        assert d.kind == "mismatch", (case.name, d.kind)
        out.append(Repair(case, render(wrong, np.random.default_rng(len(out))), d.edit))
    return out


class _Editor:
    """A stand-in for the pipeline's editing call: the judge's reading of the input with the fix applied (or the
    input itself), ``num_images_per_prompt`` times."""

    def __init__(self, carry_out: bool):
        self.carry_out = carry_out

    def __call__(self, prompt, input_images, generator, num_images_per_prompt):
        (image,) = input_images
        if self.carry_out:
            image = render(Edit.parse(prompt).apply(judge.read(image)), np.random.default_rng(0))
        return SimpleNamespace(images=[image] * num_images_per_prompt)


def test_an_editor_that_carries_out_the_fix_passes_every_repair():
    repairs = _wrong_drawings()
    r = repair_rates(_Editor(carry_out=True), repairs, candidates=3)
    assert (r.repairs, r.passed, r.cases, r.cases_repaired) == (36, 36, 12, 12) and r.rate == 1.0
    assert r.by_kind == {"recolor": (36, 36)}
    none = repair_rates(_Editor(carry_out=False), repairs, candidates=2)
    assert (none.repairs, none.passed, none.cases_repaired, none.rate) == (24, 0, 0, 0.0)


def test_probe_on_the_bundled_model():
    from omnigen2 import OmniGen2ChatPipeline, OmniGen2Pipeline

    pipe = OmniGen2Pipeline.from_pretrained("builtin:shapes")
    pipe.set_progress_bar_config(disable=True)
    repairs = one_edit_repairs(OmniGen2ChatPipeline(pipe), 24)
    for r in repairs:  # each drawing fails its case, and the recorded fix alone repairs what the judge read
        assert not judge.check(r.case, r.drawing, []).passed
        assert r.case.target.check(r.fix.apply(judge.read(r.drawing)))[0]
    rates = repair_rates(pipe, repairs, candidates=2)
    assert rates.repairs == 2 * len(repairs) and sum(b for _, b in rates.by_kind.values()) == rates.repairs
