"""Can the editing path carry out a reflection's repair? The judge's own fixes of held-out drawings, edited.

A reflection gains only what its repairs fix, so this isolates the editing path: the first model draws the
held-out text-to-image cases in chat turns (as a reflection judges them, ``<|img|>`` forced), the judge reads
each drawing and, where one edit repairs it (a ``mismatch`` diagnosis, :func:`omnigen2.shapes.reflection.diagnose`),
that fix is drawn through each given model's editing path (``OmniGen2Pipeline``, the drawing as the input image)
with K noises, one batch, as a reflection round draws its candidates. Every repair is scored by the judge
against the case. The MLLM's verdicts and fixes play no part: the same drawings and fixes go to every model::

    python experiments/repair_probe.py [MODEL ...] [--n 300] [--candidates 4] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import PIL.Image
import torch

from omnigen2.eval import shapesbench as sb
from omnigen2.shapes import judge
from omnigen2.shapes.reflection import diagnose
from omnigen2.shapes.tasks import Case, Edit, cases, stable_hash


@dataclass
class Repair:
    case: Case
    drawing: PIL.Image.Image
    fix: Edit


@dataclass
class RepairRates:
    repairs: int  # edits drawn (cases x candidates)
    passed: int  # of them, judged to pass the case
    cases: int
    cases_repaired: int  # cases with at least one passing candidate
    by_kind: dict[str, tuple[int, int]]  # fix kind -> (passing, drawn)

    @property
    def rate(self) -> float:
        return self.passed / max(self.repairs, 1)


def one_edit_repairs(chat, n: int, seed: int = 0) -> list[Repair]:
    """The chat's drawings of the first ``n`` held-out t2i cases (ShapesBench's noise for ``seed``) that the judge
    repairs with one edit, with that edit."""
    out, draw = [], sb.chat_generate(chat, force_draw=True)
    for case in cases("t2i", n, split="eval"):
        drawing = draw(case.prompt, [], sb.case_generator(seed, case)).value
        d = diagnose(case, drawing)
        if d.kind == "mismatch":
            out.append(Repair(case, drawing, d.edit))
    return out


def repair_rates(pipe, repairs: list[Repair], candidates: int = 4) -> RepairRates:
    """Each fix drawn ``candidates`` times through ``pipe``'s editing path and judged against its case."""
    passed = cases_repaired = 0
    kinds: dict[str, list[int]] = {}
    for r in repairs:
        g = torch.Generator().manual_seed(stable_hash("repair-probe", r.case.name) % 2**63)
        outs = pipe(prompt=r.fix.prompt(), input_images=[r.drawing], generator=g, num_images_per_prompt=candidates)
        ok = [judge.check(r.case, o, []).passed for o in outs.images]
        passed += sum(ok)
        cases_repaired += any(ok)
        k = kinds.setdefault(r.fix.kind, [0, 0])
        k[0] += sum(ok)
        k[1] += len(ok)
    return RepairRates(
        len(repairs) * candidates, passed, len(repairs), cases_repaired, {k: tuple(v) for k, v in kinds.items()}
    )


def main(argv=None) -> int:
    from omnigen2.pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline

    p = argparse.ArgumentParser(prog="python experiments/repair_probe.py", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", default=["builtin:shapes"], help="pipelines; the first one draws")
    p.add_argument("--n", type=int, default=300, help="held-out t2i cases drawn")
    p.add_argument("--candidates", type=int, default=4, help="noises per repair")
    p.add_argument("--seed", type=int, default=0, help="the drawings' noise seed, as `eval shapes --seed`")
    args = p.parse_args(argv)
    if args.n < 1 or args.candidates < 1:
        p.error(f"--n and --candidates must be >= 1, got {args.n} and {args.candidates}")
    pipes = []
    for m in args.models:
        pipe = OmniGen2Pipeline.from_pretrained(m)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    repairs = one_edit_repairs(OmniGen2ChatPipeline(pipes[0]), args.n, args.seed)
    fixes = Counter(r.fix.kind for r in repairs)
    print(f"{len(repairs)} of {args.n} drawings of {args.models[0]} are repaired by one edit: {dict(fixes)}")
    for m, pipe in zip(args.models, pipes, strict=True):
        r = repair_rates(pipe, repairs, args.candidates)
        kinds = ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(r.by_kind.items()))
        print(
            f"{m}: repairs passing {r.passed}/{r.repairs} = {r.rate:.3f}; "
            f"cases with a passing repair {r.cases_repaired}/{r.cases}; by fix: {kinds}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
