"""Which version should reflection hand back? Every version of each case's reflection, scored by the judge.

For each held-out ShapesBench image case the chat pipeline draws (the answer forced to start with ``<|img|>``,
as ``--force-draw``), then the MLLM judges the drawing and, on a mismatch, its fix edits it; every repair is
judged, up to ``--repairs``. The ShapesBench judge scores every version. From one trace the final score of any
keep policy and any number of repairs N <= ``--repairs`` follows without drawing again:

- ``none``: the drawing (reflect=0);
- ``last``: the last repair, judged or not (the chat pipeline's earlier rule: N judgements, N repairs);
- ``accepted``: the version the MLLM judged a match, else the drawing (the chat pipeline's rule);
- ``oracle``: passes when any version passes (what a perfect choice among the versions would give).

``accepted`` with N repairs is exactly what ``OmniGen2ChatPipeline(reflect=N)`` returns (a test checks it)::

    python experiments/reflection_trace.py [MODEL] [--n 300] [--tasks t2i] [--split eval] [--repairs 3]
        [--candidates K] [--seed S]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from omnigen2.eval import shapesbench as sb
from omnigen2.shapes import judge
from omnigen2.shapes.tasks import Case, cases

POLICIES = ("none", "last", "accepted", "oracle")


def trace(chat, case: Case, generator: torch.Generator, repairs: int = 3, images: bool = False, **kwargs) -> dict:
    """One case: the drawing and its chained repairs (``chat.reflect``), with the judge's pass of every version
    and the MLLM's verdict on each (``images``: the versions too, as PIL images). ``kwargs`` go to the chat call
    (sampling settings)."""
    from omnigen2.pipelines.pipeline_chat import IMG_TOKEN

    inputs = case.input_images()
    chat.reset()
    out = chat(
        case.prompt,
        input_images=inputs or None,
        reflect=repairs,
        generator=generator,
        height=sb.CANVAS,
        width=sb.CANVAS,
        assistant_prefix=IMG_TOKEN,
        **kwargs,
    )
    versions = [out.rounds[0].judged, *(r.image for r in out.rounds if r.image is not None)]
    record = {
        "task": case.task,
        "category": case.category,
        "name": case.name,
        "passes": [judge.check(case, v, inputs).passed for v in versions],
        "verdicts": [r.verdict for r in out.rounds],
        "fixes": [r.fix for r in out.rounds if r.image is not None],
        "kept": out.kept,
    }
    tried = [r for r in out.rounds if r.candidates]
    if tried:  # several candidates per repair: the judge's pass, the MLLM's verdict and score on every one
        record["candidate_passes"] = [[judge.check(case, c, inputs).passed for c in r.candidates] for r in tried]
        record["candidate_verdicts"] = [r.candidate_verdicts for r in tried]
        record["candidate_scores"] = [r.candidate_scores for r in tried]
    if images:
        record["images"] = versions
    return record


def kept_version(policy: str, verdicts: list[str], versions: int, repairs: int) -> int:
    """The version (0: the drawing, k: the k-th repair) ``policy`` keeps after at most ``repairs`` repairs, from a
    trace of ``versions`` versions where version k was judged ``verdicts[k]``. Not for "oracle"."""
    n = min(repairs, versions - 1)  # the repairs made within the limit
    if policy == "none":
        return 0
    if policy == "last":
        return n
    if policy == "accepted":
        return next((k for k in range(n + 1) if verdicts[k] == "match"), 0)
    raise ValueError(f"unknown policy {policy!r}; policies are {', '.join(POLICIES)}")


def keep(policy: str, passes: list[bool], verdicts: list[str], repairs: int) -> bool:
    """Whether what ``policy`` keeps after at most ``repairs`` repairs passes the judge (``oracle``: any version
    within the limit passes)."""
    if policy == "oracle":
        return any(passes[: min(repairs, len(passes) - 1) + 1])
    return passes[kept_version(policy, verdicts, len(passes), repairs)]


def scores(traces: list[dict], policy: str, repairs: int) -> dict[str, dict[str, float]]:
    """task -> {category: pass rate, "mean": the mean of the categories (ShapesBench's task score)}."""
    per = defaultdict(lambda: defaultdict(list))
    for t in traces:
        per[t["task"]][t["category"]].append(keep(policy, t["passes"], t["verdicts"], repairs))
    out = {}
    for task, cats in per.items():
        out[task] = {c: sum(v) / len(v) for c, v in cats.items()}
        out[task]["mean"] = sum(out[task].values()) / len(cats)
    return out


def table(traces: list[dict], repairs: int) -> str:
    lines = []
    for n in range(1, repairs + 1):
        for policy in POLICIES:
            for task, s in scores(traces, policy, n).items():
                cats = " ".join(f"{c} {v:.3f}" for c, v in s.items() if c != "mean")
                lines.append(f"N={n} {policy:8s} {task:4s} {s['mean']:.3f}  {cats}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from omnigen2.pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline

    p = argparse.ArgumentParser(prog="python experiments/reflection_trace.py", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="builtin:shapes", help="pipeline directory or builtin:NAME")
    p.add_argument("--n", type=int, default=300, help="cases per task")
    p.add_argument("--tasks", default="t2i", help="comma-separated image tasks: t2i, edit, ic")
    p.add_argument("--split", default="eval", choices=("eval", "train"), help="held-out (eval) or training cases")
    p.add_argument("--repairs", type=int, default=3, help="most repairs per case (each judged)")
    p.add_argument(
        "--candidates", type=int, default=None, help="repairs drawn per round, the MLLM choosing (the model's)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed, as `eval shapes --seed` (the cases stay the same)")
    p.add_argument("--out", default=None, help="write the traces here (JSON lines)")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in sb.IMAGE_TASKS]
    if bad or not tasks:
        p.error(f"--tasks takes image tasks ({', '.join(sb.IMAGE_TASKS)}), got {args.tasks!r}")
    if args.n < 1 or args.repairs < 1 or (args.candidates is not None and args.candidates < 1):
        p.error(f"--n, --repairs and --candidates must be >= 1, got {args.n}, {args.repairs}, {args.candidates}")
    pipe = OmniGen2Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    chat = OmniGen2ChatPipeline(pipe)
    traces = []
    sink = Path(args.out).open("w") if args.out else None
    from tqdm.auto import tqdm

    for case in tqdm([c for t in tasks for c in cases(t, args.n, split=args.split)], desc="trace"):
        # The generator ShapesBench seeds for this case, so "none" and "accepted" are `eval shapes --reflect`.
        g = sb.case_generator(args.seed, case)
        traces.append(trace(chat, case, g, args.repairs, reflect_candidates=args.candidates))
        if sink:
            sink.write(json.dumps(traces[-1]) + "\n")
            sink.flush()
    if sink:
        sink.close()
    print(table(traces, args.repairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
