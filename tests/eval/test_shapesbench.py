"""ShapesBench end to end: an oracle scores 1.0, the tiny pipeline runs and is reported, the CLI works; text tasks
and reflection through the chat pipeline on the official-tiny checkpoint (a random MLLM: small n, few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen2 import OmniGen2ChatPipeline
from omnigen2.cli import main
from omnigen2.eval.shapesbench import (
    CaseResult,
    Report,
    benchmark_cases,
    chat_answer,
    chat_generate,
    oracle,
    oracle_answer,
    pipeline_generate,
    run,
    score_text,
)
from omnigen2.pipelines.pipeline_chat import Turn
from omnigen2.shapes.tasks import MATCHES, TASKS, split_of

MISMATCH_ANSWER = "the image does not match the instruction: the red circle should be blue. make the red circle blue"


@pytest.fixture
def chat(tiny_pipe):
    return OmniGen2ChatPipeline(tiny_pipe, reflection="shapes")


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
    assert len(report.results) == 6 and [r.task for r in report.results] == ["t2i"] * 2 + ["edit"] * 2 + ["ic"] * 2
    assert report.overall == pytest.approx(sum(report.task_score(t) for t in ("t2i", "edit", "ic")) / 3)
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
    assert "failures" not in table  # no case says what it got wrong


def test_failures_count_what_the_failed_cases_got_wrong():
    r = lambda ok, wrong: CaseResult("t2i", "single", 0, "p", ok, "", {"wrong": wrong})  # noqa: E731
    report = Report([r(True, []), r(False, ["color", "dot"]), r(False, ["dot"]), r(False, ["unreadable"])])
    assert report.failures("t2i") == {"failed": 3, "unreadable": 1, "color": 1, "dot": 2}
    assert report.summary()["tasks"]["t2i"]["failures"] == report.failures("t2i")
    assert "t2i failures (3 cases) got wrong: unreadable 1, color 1, dot 2" in report.table()


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
    # Without --model: the bundled model.
    assert main(["eval", "shapes", "--n", "1", "--tasks", "t2i", "--out", str(tmp_path / "x")]) == 0
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    assert report["config"]["model"] == "builtin:shapes" and len(report["cases"]) == 1
    assert main(["eval", "shapes", "--model", "builtin:nonexistent", "--n", "1", "--out", str(tmp_path / "y")]) == 2
    assert "no builtin model" in capsys.readouterr().err


# -- understanding, reflection and the chat path -------------------------------------------------------------------


def test_cli_oracle_scores_one_on_every_task(tmp_path, capsys):
    args = ["eval", "shapes", "--model", "oracle", "--n", "7", "--out", str(tmp_path)]
    assert main([*args, "--tasks", "understanding,reflection,edit"]) == 0
    assert "fix repairs" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    summary = data["summary"]
    assert summary["overall"] == 1.0 and list(summary["tasks"]) == ["edit", "understanding", "reflection"]
    assert summary["tasks"]["reflection"]["partial"] == {
        "exact": {"score": 1.0, "n": 7},
        "fix_repairs": {"score": 1.0, "n": 6},
    }
    assert len(data["cases"]) == 21 and data["config"]["images"] == "pipeline"


def test_cli_real_model_answers_text_tasks_in_one_report(official_tiny, tmp_path, capsys):
    ckpt = str(official_tiny / "checkpoint")
    args = ["--model", ckpt, "--n", "2", "--steps", "1", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["eval", "shapes", *args, "--tasks", "t2i,understanding,reflection", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "understanding" in out and "reflection" in out and "overall" in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["summary"]["tasks"]) == {"t2i", "understanding", "reflection"} and len(data["cases"]) == 6
    text = [c for c in data["cases"] if c["task"] != "t2i"]
    assert all(isinstance(c["details"]["answer"], str) and c["reason"] for c in text)
    assert data["config"]["max_new_tokens"] == 6 and data["config"]["reflect"] is None
    assert Image.open(tmp_path / "samples.png").size[1] >= 6 * 64


def test_chat_answer_asks_the_case_question_in_a_fresh_conversation(chat, monkeypatch):
    asked, build = [], chat.build_inputs
    monkeypatch.setattr(chat, "build_inputs", lambda turns: asked.append(turns) or build(turns))
    chat.history.append(Turn("an earlier turn"))  # reset() must clear it
    case_list = benchmark_cases(["understanding", "reflection"], 2)
    run(None, 2, ["understanding", "reflection"], progress=False, answer_fn=chat_answer(chat, max_new_tokens=4))
    assert len(asked) == 4 and all(len(turns) == 1 for turns in asked)
    for turns, case in zip(asked, case_list):
        (image,) = case.input_images()
        assert turns[0].prompt == case.prompt and turns[0].images[0].tobytes() == image.tobytes()


def test_reflect_records_rounds_and_self_verdicts(official_tiny, chat, monkeypatch, tmp_path):
    ckpt = str(official_tiny / "checkpoint")
    args = ["eval", "shapes", "--model", ckpt, "--n", "2", "--tasks", "t2i,ic", "--steps", "1", "--device", "cpu"]
    flags = ["--reflect", "1", "--reflect-candidates", "2", "--force-draw", "--out", str(tmp_path)]
    assert main([*args, *flags]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    expected = {"images": "chat", "reflect": 1, "reflect_candidates": 2, "force_draw": True}
    assert data["config"] | expected == data["config"]
    assert all(c["details"]["reflect_rounds"] == 1 and c["details"]["drew"] for c in data["cases"])
    agree = data["summary"]["tasks"]["ic"]["self_verdict_agreement"]
    assert agree["n"] == 2 and agree["unparsed"] + agree["match_failed"] + agree["mismatch_failed"] == 2
    assert data["summary"]["tasks"]["t2i"]["reflection"]["rounds"] == 1.0
    assert main([*args, "--reflect-candidates", "2", "--out", str(tmp_path)]) == 2  # needs --reflect N > 0
    with pytest.raises(SystemExit) as refused:  # argparse refuses the value: usage error, exit code 2
        main([*args, "--reflect", "1", "--reflect-candidates", "0", "--out", str(tmp_path)])
    assert refused.value.code == 2

    # Scripted verdicts on the (failing) random drawings: a match disagrees; a mismatch agrees and is repaired,
    # and the repair, judged a match, is kept.
    answers = iter([MATCHES, MISMATCH_ANSWER, MATCHES])
    monkeypatch.setattr(chat, "judge_scored", lambda image, instruction, max_new_tokens=64: (next(answers), 0.0))
    report = run(chat_generate(chat, reflect=1, steps=1, force_draw=True), n=2, tasks=["t2i"], progress=False)
    first, second = (r.details for r in report.results)
    assert (first["self_verdict"], first["self_verdict_agrees"], first["image_changed"]) == ("match", False, False)
    assert (second["self_verdict"], second["self_verdict_agrees"], second["image_changed"]) == ("mismatch", True, True)
    assert not first["first_passed"] and not second["first_passed"]
    assert (first["reflect_rounds"], first["kept"], second["reflect_rounds"], second["kept"]) == (1, 0, 2, 1)
    agree = report.summary()["tasks"]["t2i"]["self_verdict_agreement"]
    assert (agree["score"], agree["match_failed"], agree["mismatch_failed"]) == (0.5, 1, 1)
    assert "self verdict agreement" in report.table()


def test_text_answer_to_an_image_case_fails(chat):
    report = run(chat_generate(chat, reflect=0, steps=1, max_new_tokens=4), n=1, tasks=["ic"], progress=False)
    (r,) = report.results
    assert not r.passed and r.reason.startswith("answered with text: ")
    assert r.details["drew"] is False and r.details["subject_consistency"] is False


def test_chat_t2i_without_reflection_is_the_pipeline_on_the_chat_conditioning(chat, tiny_pipe):
    """--reflect 0 --force-draw is not OmniGen2Pipeline(prompt): the chat template ends with the assistant
    generation prompt, which the generation pipeline's omits, so the conditioning (and the negative) has those
    rows more; the rows they share are equal. Given the chat's conditioning, the pipeline draws the same image."""
    prompt, kw = "a red square", dict(height=64, width=64, num_inference_steps=1)
    made = chat_generate(chat, reflect=0, steps=1, force_draw=True)(prompt, [], torch.Generator().manual_seed(0))
    chat.reset()
    out = chat(prompt, assistant_prefix="<|img|>", generator=torch.Generator().manual_seed(0), **kw)
    embeds, _ = tiny_pipe.encode_text([prompt], None, "cpu")
    extra = tiny_pipe.tokenizer.decode(out.input_ids[0, embeds.shape[1] :])
    assert extra == "<|im_start|>assistant\n" and torch.equal(out.prompt_embeds[:, : embeds.shape[1]], embeds)
    neg, neg_mask = chat.encode_negative("")
    ref = tiny_pipe(
        prompt_embeds=out.prompt_embeds,
        prompt_attention_mask=out.prompt_attention_mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images[0]
    assert np.array_equal(np.asarray(made.value), np.asarray(ref)) and made.details["reflect_rounds"] == 0


def test_cli_eval_shapes_errors(tmp_path, capsys):
    args = ["eval", "shapes", "--n", "1", "--out", str(tmp_path)]
    assert main([*args, "--model", "/no/such/model", "--tasks", "t2i,drawing"]) == 2  # before loading the model
    assert "unknown tasks ['drawing']" in capsys.readouterr().err
    assert main([*args, "--model", "oracle", "--force-draw"]) == 2
    assert "--reflect" in capsys.readouterr().err
    assert main([*args, "--model", "oracle", "--reflect", "1"]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main([*args, "--model", "/no/such/model", "--tasks", "ic", "--categories", "place,recolor"]) == 2
    assert "unknown categories ['recolor'] for tasks ic" in capsys.readouterr().err
    assert main([*args, "--model", "oracle", "--tasks", "ic", "--categories", "row"]) == 2  # n=1: one place case
    assert "no cases of categories ['row']" in capsys.readouterr().err
    assert main([*args, "--model", "/no/such/model", "--image-guidance", "0.5"]) == 2
    assert "--image-guidance must be >= 1, got 0.5" in capsys.readouterr().err


def test_cli_guidance_and_categories_reach_the_pipeline(tmp_path, capsys, monkeypatch):
    import omnigen2.eval.shapesbench as sb

    seen = []
    real = sb.pipeline_generate

    def spy(pipe, **kwargs):
        seen.append(kwargs)
        return real(pipe, **kwargs)

    monkeypatch.setattr(sb, "pipeline_generate", spy)
    args = ["eval", "shapes", "--n", "8", "--tasks", "ic,edit", "--steps", "1", "--out", str(tmp_path)]
    assert main([*args, "--categories", "place,background", "--text-guidance", "2", "--image-guidance", "1"]) == 0
    assert seen == [{"steps": 1, "text_guidance_scale": 2.0, "image_guidance_scale": 1.0}]
    data = json.loads((tmp_path / "report.json").read_text())
    assert sorted(c["category"] for c in data["cases"]) == ["background", "place", "place"]
    assert data["config"]["categories"] == ["place", "background"]
    assert data["config"]["image_guidance_scale"] == 1.0
