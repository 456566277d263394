"""Property tests of the prompted protocol's reader: the verdict and the instruction survive any mix of the
phrasings the question allows, and no text makes it fail or return a mismatch without an instruction."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from omnigen2.pipelines.reflection import VERDICTS, parse_prompted  # noqa: E402

WORDS = ["make", "the", "circle", "blue", "red", "car", "add", "a", "tree", "left", "remove", "cat", "turn", "sky"]
phrase = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
instruction = st.tuples(phrase, st.sampled_from(["", "."])).map(lambda t: t[0][0].upper() + t[0][1:] + t[1])
mismatch_word = st.sampled_from(["MISMATCH", "Mismatch", "mismatch", "MISMATCH.", "Mismatch!", "No"])
match_word = st.sampled_from(["MATCH", "Match", "match", "MATCH.", "Yes", "yes."])
verdict_line = st.sampled_from(
    ["{}", "Verdict: {}", "**Verdict:** {}", "verdict - {}", "1. {}", "**{}**", "Answer: {}"]
)
reason_line = st.sampled_from(["Reason: {}", "**Reason:** {}", "- Reason: {}", "2. Reason: {}", "reason: {}"])
fix_line = st.sampled_from(
    ["Instruction: {}", "**Instruction:** {}", "Fix: {}", "Revised instruction: {}", "3. Instruction: {}", "- Edit: {}"]
)
separator = st.sampled_from(["\n", "\n\n", "\n  "])


@settings(max_examples=300, deadline=None)
@given(mismatch_word, verdict_line, st.none() | phrase, reason_line, instruction, fix_line, separator)
def test_a_mismatch_keeps_its_instruction(word, verdict, reason, reason_fmt, fix, fix_fmt, sep):
    lines = [verdict.format(word), *([reason_fmt.format(reason)] if reason else []), fix_fmt.format(fix)]
    got, problem, got_fix = parse_prompted(sep.join(lines))
    assert (got, got_fix) == ("mismatch", fix)
    if reason:
        assert problem == reason


@settings(max_examples=200, deadline=None)
@given(match_word, verdict_line, phrase, separator)
def test_a_match_is_a_match_whatever_follows(word, verdict, reason, sep):
    answer = sep.join([verdict.format(word), f"Reason: {reason}", "Instruction: none"])
    assert parse_prompted(answer) == ("match", None, None)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), phrase, instruction, st.booleans())
def test_json_answers(match, reason, fix, fenced):
    body = json.dumps({"match": match, "reason": reason, "instruction": fix})
    answer = f"```json\n{body}\n```" if fenced else body
    assert parse_prompted(answer) == (("match", None, None) if match else ("mismatch", reason, fix))


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_text_reads_as_a_verdict(text):
    verdict, problem, fix = parse_prompted(text)
    assert verdict in VERDICTS
    assert (fix is not None and fix.strip() != "") if verdict == "mismatch" else (problem, fix) == (None, None)
