"""ShapesBench end to end: an oracle scores 1.0, the tiny pipeline runs and is reported, the CLI works."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from omnigen2.cli import main
from omnigen2.eval.shapesbench import (
    CaseResult,
    Report,
    benchmark_cases,
    oracle,
    oracle_answer,
    pipeline_generate,
    run,
    score_text,
)
from omnigen2.shapes.tasks import TASKS, split_of


def test_oracle_scores_one_on_held_out_cases(tmp_path):
    report = run(oracle(benchmark_cases(["t2i", "edit", "ic"], 12)), n=12, out_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["overall"] == 1.0 and report.overall == 1.0
    assert summary["tasks"]["t2i"]["categories"]["counting"] == {"score": 1.0, "passed": 2, "n": 2}
    assert summary["tasks"]["ic"]["partial"]["subject_consistency"] == {"score": 1.0, "n": 12}
    assert all(split_of(r.seed) == "eval" for r in report.results)
    assert Image.open(tmp_path / "samples.png").size[1] > 64 * 16  # two rows for each of the 16 categories


def test_tiny_pipeline_end_to_end(tiny_pipe, tmp_path):
    report = run(pipeline_generate(tiny_pipe, steps=1), n=2, out_dir=tmp_path, progress=False)
    assert len(report.results) == 6 and 0.0 <= report.overall <= 1.0
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["summary"]["tasks"]) == {"t2i", "edit", "ic"} and len(data["cases"]) == 6
    assert all(isinstance(c["passed"], bool) and c["reason"] for c in data["cases"])
    assert Image.open(tmp_path / "samples.png").size[1] >= 6 * 64


def test_scores_are_category_means_and_the_table_lists_everything():
    r = lambda cat, ok: CaseResult("t2i", cat, 0, "p", ok, "", {})  # noqa: E731
    report = Report([r("single", True), r("single", False), r("two", True), r("counting", False)])
    assert report.categories("t2i") == {"single": (1, 2), "two": (1, 1), "counting": (0, 1)}
    assert report.task_score("t2i") == pytest.approx((0.5 + 1 + 0) / 3)  # not the pooled 2 / 4
    table = report.table()
    assert "single" in table and "counting" in table and "overall" in table


def test_understanding_and_reflection_scoring(tmp_path):
    report = score_text(oracle_answer, n=8, tasks=["understanding"], out_dir=tmp_path, progress=False)
    assert report.overall == 1.0 and (tmp_path / "report.json").is_file()
    always_yes = score_text(
        lambda image, q: "The image matches the instruction.", n=7, tasks=["reflection"], progress=False
    )
    assert always_yes.categories("reflection") == {c: (int(c == "match"), 1) for c in TASKS["reflection"]}


def test_cli_eval_shapes(tmp_path, capsys):
    assert main(["eval", "shapes", "--model", "oracle", "--n", "6", "--tasks", "t2i", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attribute binding" in out and "overall" in out and (tmp_path / "samples.png").is_file()
    assert main(["eval", "shapes", "--n", "1", "--out", str(tmp_path / "x")]) == 2
    assert "no builtin model" in capsys.readouterr().err
