"""The reflection trace: its keep policies on hand-made traces, and the "accepted" policy against what the chat
pipeline returns for each number of repairs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from experiments.reflection_trace import keep, kept_version, main, scores, trace
from omnigen2 import OmniGen2ChatPipeline
from omnigen2.eval import shapesbench as sb
from omnigen2.pipelines.pipeline_chat import IMG_TOKEN
from omnigen2.shapes.tasks import MATCHES

MISMATCH_ANSWER = "the image does not match the instruction: the red circle should be blue. make the red circle blue"


def test_keep_policies():
    # drawing fails, repair 1 passes but is judged a mismatch, repair 2 fails and is judged a match
    passes, verdicts = [False, True, False], ["mismatch", "mismatch", "match"]
    assert [keep("none", passes, verdicts, n) for n in (1, 2, 3)] == [False] * 3
    assert [keep("last", passes, verdicts, n) for n in (1, 2, 3)] == [True, False, False]
    assert [keep("accepted", passes, verdicts, n) for n in (1, 2, 3)] == [False, False, False]
    assert [kept_version("accepted", verdicts, 3, n) for n in (1, 2, 3)] == [0, 2, 2]
    assert [keep("oracle", passes, verdicts, n) for n in (1, 2, 3)] == [True, True, True]
    # a drawing judged a match at once is kept whatever the limit
    assert keep("accepted", [True], ["match"], 3) and kept_version("last", ["unparsed"], 1, 3) == 0
    with pytest.raises(ValueError, match="unknown policy"):
        keep("best", passes, verdicts, 1)
    t = lambda cat, p, v: {"task": "t2i", "category": cat, "passes": p, "verdicts": v}  # noqa: E731
    s = scores(
        [t("single", [True], ["match"]), t("single", [False], ["unparsed"]), t("two", passes, verdicts)], "last", 1
    )
    assert s["t2i"] == {"single": 0.5, "two": 1.0, "mean": 0.75}


def test_accepted_is_what_the_chat_pipeline_returns(tiny_pipe, monkeypatch):
    """A scripted judge (mismatch, mismatch, match): the trace's versions and verdicts, and for 1, 2 and 3 repairs
    the chat pipeline returns exactly the version the "accepted" policy names."""
    chat = OmniGen2ChatPipeline(tiny_pipe, reflection="shapes")  # the scripted answers are Shapes sentences
    script = [MISMATCH_ANSWER, MISMATCH_ANSWER, MATCHES]
    answers = iter(())
    monkeypatch.setattr(chat, "judge_scored", lambda image, instruction, max_new_tokens=64: (next(answers), 0.0))
    case = sb.benchmark_cases(["t2i"], 1)[0]
    seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    answers = itertools.chain(script)
    t = trace(chat, case, seed(), repairs=3, images=True, num_inference_steps=1)
    assert t["verdicts"] == ["mismatch", "mismatch", "match"] and len(t["images"]) == len(t["passes"]) == 3
    assert t["fixes"] == ["make the red circle blue"] * 2 and t["kept"] == 2
    for n in (1, 2, 3):
        answers = itertools.chain(script)
        chat.reset()
        kw = dict(height=sb.CANVAS, width=sb.CANVAS, num_inference_steps=1)
        out = chat(case.prompt, reflect=n, generator=seed(), assistant_prefix=IMG_TOKEN, **kw)
        k = kept_version("accepted", t["verdicts"], len(t["passes"]), n)
        assert out.kept == k and np.array_equal(np.asarray(out.images[0]), np.asarray(t["images"][k])), n


def test_candidates_trace_what_the_chat_pipeline_returns(tiny_pipe, monkeypatch):
    """Two candidates per repair, scripted (verdict, score) judgements: the trace records every candidate's pass
    and verdict, and the chat pipeline keeps the version the "accepted" policy names."""
    chat = OmniGen2ChatPipeline(tiny_pipe, reflection="shapes")  # the scripted answers are Shapes sentences
    no, yes = MISMATCH_ANSWER, MATCHES
    script = [(no, -3.0), (no, -2.0), (no, -1.0), (no, -1.0), (yes, 1.0)]
    answers = iter(())
    monkeypatch.setattr(chat, "judge_scored", lambda image, instruction, max_new_tokens=64: next(answers))
    case = sb.benchmark_cases(["t2i"], 1)[0]
    seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    kw = dict(num_inference_steps=1, reflect_candidates=2)
    answers = iter(script)
    t = trace(chat, case, seed(), repairs=3, images=True, **kw)
    assert t["verdicts"] == ["mismatch", "mismatch", "match"] and t["kept"] == 2
    assert t["candidate_verdicts"] == [["mismatch", "mismatch"], ["mismatch", "match"]]
    assert t["candidate_scores"] == [[-2.0, -1.0], [-1.0, 1.0]] and [len(p) for p in t["candidate_passes"]] == [2, 2]
    for n in (1, 2, 3):
        answers = iter(script)
        chat.reset()
        out = chat(
            case.prompt,
            reflect=n,
            generator=seed(),
            assistant_prefix=IMG_TOKEN,
            height=sb.CANVAS,
            width=sb.CANVAS,
            **kw,
        )
        k = kept_version("accepted", t["verdicts"], len(t["passes"]), n)
        assert out.kept == k and np.array_equal(np.asarray(out.images[0]), np.asarray(t["images"][k])), n
    assert out.rounds[0].image is out.rounds[0].candidates[1]  # the better scored of two rejected repairs


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--tasks", "understanding"])
    assert "image tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--repairs", "0"])
    with pytest.raises(SystemExit):
        main(["--candidates", "0"])
    assert "--candidates must be >= 1" in capsys.readouterr().err
