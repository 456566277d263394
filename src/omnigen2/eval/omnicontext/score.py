"""OmniContext scores: per sample overall = sqrt(PF x SC); per task type the mean over its judged samples; the
average is the unweighted mean over task types; with several seeds per prompt, the mean and the standard deviation
(over seeds) of each of those numbers, each seed's run scored as a whole benchmark.

A sample without both scores (its image failed, or the judge gave no usable reply) is a failure: counted and
listed, left out of the means, never given a score.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from . import TASK_TYPES

METRICS = ("PF", "SC", "overall")


@dataclass
class Sample:
    task_type: str
    key: str
    seed: int
    id: str  # the batch record id
    image: str | None  # relative to the output folder; None when generation failed
    PF: float | None = None
    SC: float | None = None
    PF_scores: list | None = None
    SC_scores: list | None = None
    PF_reasoning: str = ""
    SC_reasoning: str = ""
    errors: list | None = None  # why it is a failure

    @property
    def overall(self) -> float | None:
        return None if self.PF is None or self.SC is None else math.sqrt(self.PF * self.SC)

    def to_dict(self) -> dict:
        return {**asdict(self), "overall": self.overall}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(samples: list[Sample]) -> dict:
    """One run (one seed per prompt): ``{task_type: {PF, SC, overall, n, failures}, "average": {...}}``. The
    average is None when a task type has no judged sample (a mean over the rest would hide it)."""
    table = {}
    for task in [t for t in TASK_TYPES if any(s.task_type == t for s in samples)]:
        mine = [s for s in samples if s.task_type == task]
        ok = [s for s in mine if s.overall is not None]
        row = {m: _mean([getattr(s, m) for s in ok]) for m in METRICS}
        table[task] = {**row, "n": len(ok), "failures": len(mine) - len(ok)}
    rows = list(table.values())
    complete = bool(rows) and all(r["n"] for r in rows)
    average = {m: _mean([r[m] for r in rows]) if complete else None for m in METRICS}
    table["average"] = {**average, "n": sum(r["n"] for r in rows), "failures": sum(r["failures"] for r in rows)}
    return table


def combine(runs: list[dict]) -> dict:
    """The per-seed summaries as one: each number the mean over seeds, with ``{metric}_std`` (sample standard
    deviation, n - 1) when there are several seeds; n and failures summed."""
    out = {}
    for row in runs[0]:
        values = {m: [r[row][m] for r in runs] for m in METRICS}
        cell = {}
        for m, vs in values.items():
            known = None if any(v is None for v in vs) else vs
            cell[m] = _mean(known) if known else None
            if len(runs) > 1:
                cell[f"{m}_std"] = statistics.stdev(known) if known else None
        cell["n"] = sum(r[row]["n"] for r in runs)
        cell["failures"] = sum(r[row]["failures"] for r in runs)
        out[row] = cell
    return out


def markdown(scores: dict, seeds: int) -> str:
    """The report table: task types and the average as rows; PF, SC, overall and failures as columns."""

    def cell(row: dict, m: str) -> str:
        if row[m] is None:
            return "—"
        return f"{row[m]:.3f} ± {row[m + '_std']:.3f}" if seeds > 1 else f"{row[m]:.3f}"

    lines = ["| task type | PF | SC | overall | failures |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in scores.items():
        label = f"**{name}**" if name == "average" else name
        lines.append(
            f"| {label} | {cell(row, 'PF')} | {cell(row, 'SC')} | {cell(row, 'overall')} | {row['failures']} |"
        )
    return "\n".join(lines) + "\n"
