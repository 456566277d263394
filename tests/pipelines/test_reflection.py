"""Reflection protocols: the prompted protocol's reading of free-text judgements, the names a checkpoint gives its
protocol and domain by (and what an unknown name does), and the prompted protocol driving the chat's reflection
loop on the official-tiny checkpoint with scripted answers."""

from __future__ import annotations

import json
import math
import shutil
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch

from omnigen2 import OmniGen2ChatPipeline, OmniGen2Pipeline, loading
from omnigen2.loading import CheckpointError, inspect_layout, registered, resolve_named
from omnigen2.pipelines.reflection import PROMPTED, ReflectionProtocol, parse_prompted, read_verdict, resolve_protocol
from tests.pipelines.spy import Spy, script

KW = dict(height=64, width=64, num_inference_steps=2)
FIX = "Make the circle blue."

# -- reading free-text judgements -------------------------------------------------------------------------------

MATCHES = [
    "MATCH",
    "match",
    "Match.",
    "**MATCH**",
    "Verdict: MATCH",
    "Verdict: MATCH\nReason: none\nInstruction: none",
    "**Verdict:** Match\n**Reason:** -\n**Instruction:** N/A",
    "verdict - match",
    "1. MATCH\n2. Reason: none\n3. Instruction: none",
    "## Verdict\nMATCH",
    "Yes.",
    "yes, it does",
    "Answer: yes",
    "The image matches the instruction.",
    "the image matches the instruction.",  # the Shapes sentence reads the same
    '{"match": true}',
    '```json\n{"match": "yes", "reason": "", "instruction": ""}\n```',
    '{"verdict": "MATCH", "instruction": null}',
    "Match\nReason: none",
]

MISMATCHES = [
    ("MISMATCH\nReason: the circle is red\nInstruction: Make the circle blue.", "the circle is red"),
    ("Verdict: MISMATCH\nReason: the circle is red\nInstruction: Make the circle blue.", "the circle is red"),
    (
        "**Verdict:** MISMATCH\n**Reason:** the circle is red\n**Instruction:** Make the circle blue.",
        "the circle is red",
    ),
    ("verdict: mismatch.\nreason: the circle is red\ninstruction: Make the circle blue.", "the circle is red"),
    ("- Verdict: Mismatch\n- Reason: the circle is red\n- Instruction: Make the circle blue.", "the circle is red"),
    ("1. MISMATCH\n2. Reason: the circle is red\n3. Instruction: Make the circle blue.", "the circle is red"),
    ("## Verdict\nMISMATCH\n## Reason\nthe circle is red\n## Instruction\nMake the circle blue.", "the circle is red"),
    ("Verdict:\nMISMATCH\nReason:\nthe circle is red\nInstruction:\nMake the circle blue.", "the circle is red"),
    ("MISMATCH\nthe circle is red\nMake the circle blue.", "the circle is red"),  # the labels dropped
    ("Verdict: MISMATCH\nthe circle is red\nMake the circle blue.", "the circle is red"),
    ("MISMATCH: the circle is red\nInstruction: Make the circle blue.", "the circle is red"),
    ("No, the circle is red. Instruction: Make the circle blue.", "the circle is red."),
    ("MISMATCH. Reason: the circle is red. Fix: Make the circle blue.", "the circle is red."),
    ("The image does not match: the circle is red.\nRevised instruction: Make the circle blue.", "the circle is red."),
    ("Not a match.\nEdit: Make the circle blue.", None),
    ("Mismatch\nReason: the circle is red\nEditing instruction: Make the circle blue.", "the circle is red"),
    ("Verdict - MISMATCH\nReason - the circle is red\nInstruction - Make the circle blue.", "the circle is red"),
    ("The image doesn't match.\nReason: the circle is red\nInstruction: Make the circle blue.", "the circle is red"),
    ('{"match": false, "reason": "the circle is red", "instruction": "Make the circle blue."}', "the circle is red"),
    ('```json\n{"match": "no", "reason": "the circle is red", "instruction": "Make the circle blue."}\n```', None),
    ('Here: {"verdict": "MISMATCH", "revised_instruction": "Make the circle blue."}', None),
    ('```\n{"is_match": false, "problem": "the circle is red", "fix": "Make the circle blue."}\n```', None),
]

UNPARSED = [
    "",
    "   ",
    "a circle, maybe",
    "I am not sure.",
    "MISMATCH",  # no instruction to repair it with
    "MISMATCH\nReason: the circle is red",
    "MISMATCH\nReason: the circle is red\nInstruction: none",
    "No.",
    "Verdict: unclear\nInstruction: Make the circle blue.",
    '{"match": false, "reason": "the circle is red"}',
    '{"reason": "the circle is red"}',
    "Reason: the circle is red\nInstruction: Make the circle blue.",  # no verdict
]


@pytest.mark.parametrize("answer", MATCHES)
def test_prompted_reads_a_match(answer):
    assert parse_prompted(answer) == ("match", None, None)


@pytest.mark.parametrize(("answer", "problem"), MISMATCHES)
def test_prompted_reads_a_mismatch_and_its_fix(answer, problem):
    verdict, got_problem, fix = parse_prompted(answer)
    assert (verdict, fix) == ("mismatch", FIX), answer
    if problem is not None:
        assert got_problem == problem, answer


@pytest.mark.parametrize("answer", UNPARSED)
def test_prompted_leaves_the_rest_unparsed(answer):
    assert parse_prompted(answer) == ("unparsed", None, None)


def test_read_verdict():
    assert [read_verdict(t) for t in ("MATCH", "Mismatch!", "yes", "No, ...", "does not match", "mis-match")] == [
        "match",
        "mismatch",
        "match",
        "mismatch",
        "mismatch",
        "mismatch",
    ]
    assert read_verdict("it is not a match at all") == "mismatch" and read_verdict("") is None
    assert read_verdict("the colours are off") is None


# -- the protocol object ----------------------------------------------------------------------------------------


def test_protocol_object(tiny_pipe):
    from omnigen2.shapes.protocol import SHAPES, parse_reflection
    from omnigen2.shapes.tasks import MATCHES, MISMATCH, REFLECT_QUESTION

    question = PROMPTED.question("a red car")
    assert '"a red car"' in question and "MATCH" in question and "MISMATCH" in question
    assert "Instruction:" in question and PROMPTED.fork(tiny_pipe.tokenizer) is None
    assert SHAPES.question("a red car") == REFLECT_QUESTION.format(instruction="a red car")
    assert SHAPES.parse(MATCHES) == parse_reflection(MATCHES) == ("match", None, None)
    # the fork is where the two Shapes sentences part, as the chat pipeline computed it before protocols
    tok = tiny_pipe.tokenizer
    match, mismatch = (tok(t, add_special_tokens=False).input_ids for t in (MATCHES, MISMATCH))
    shared, match_id, mismatch_id = SHAPES.fork(tok)
    assert match[: len(shared)] == mismatch[: len(shared)] == shared and (match_id, mismatch_id) != (None, None)
    assert match[len(shared)] == match_id != mismatch_id == mismatch[len(shared)]
    odd = ReflectionProtocol("odd", "{instruction}?", lambda answer: ("maybe", None, None))
    with pytest.raises(ValueError, match="'maybe'"):
        odd.parse("anything")
    with pytest.raises(ValueError, match="prefix"):
        ReflectionProtocol("p", "{instruction}", parse_prompted, verdicts=("yes", "yes, but")).fork(tok)


# -- names: the registry, the checkpoint's key, the loader --------------------------------------------------------


def test_registered_names():
    from omnigen2.shapes.grammar import domain_warning
    from omnigen2.shapes.protocol import SHAPES

    assert {"prompted", "shapes"} <= set(registered("omnigen2_reflection"))
    assert resolve_protocol(None, {}) is PROMPTED  # the released weights name none
    assert resolve_protocol(None, {"omnigen2_reflection": "shapes"}) is SHAPES
    assert resolve_protocol("prompted", {"omnigen2_reflection": "shapes"}) is PROMPTED  # the caller's choice wins
    assert resolve_protocol(SHAPES) is SHAPES
    assert resolve_named("omnigen2_domain", "shapes") is domain_warning
    assert "Shapes World" in domain_warning("a photo of a cat") and domain_warning("a red circle") is None


@pytest.mark.parametrize("name", ["nope", "omnigen2.shapes.protocol:SHAPES", "os:system", 3])
def test_unknown_name_is_refused_naming_key_and_known(name):
    with pytest.raises(ValueError, match=r"omnigen2_reflection.*known: prompted, shapes"):
        resolve_protocol(None, {"omnigen2_reflection": name})


def test_builtin_checkpoint_names_the_shapes_protocol():
    from omnigen2 import builtin_models

    index = json.loads((builtin_models.path("shapes") / "model_index.json").read_text())
    assert (index["omnigen2_reflection"], index["omnigen2_domain"]) == ("shapes", "shapes")
    assert resolve_protocol(None, index).name == "shapes"


@pytest.fixture
def checkpoint_copy(official_tiny, tmp_path):
    """A copy of the official-tiny checkpoint and a function that edits its model_index.json."""
    root = shutil.copytree(official_tiny / "checkpoint", tmp_path / "ckpt")

    def set_index(**entries):
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps({**index, **entries}))
        return root

    return set_index


def test_the_loader_resolves_the_checkpoints_names(checkpoint_copy, tmp_path):
    root = checkpoint_copy(omnigen2_reflection="os:system")
    with pytest.raises(CheckpointError, match=r"'omnigen2_reflection' is 'os:system'.*known: prompted, shapes"):
        inspect_layout(root)  # refused before any weight is read
    root = checkpoint_copy(omnigen2_reflection="prompted", omnigen2_domain="elsewhere")
    with pytest.raises(CheckpointError, match=r"'omnigen2_domain' is 'elsewhere'.*known: shapes"):
        OmniGen2Pipeline.from_pretrained(root)
    root = checkpoint_copy(omnigen2_reflection="shapes", omnigen2_domain="shapes")
    chat = OmniGen2ChatPipeline.from_pretrained(root)
    assert chat.reflection_protocol.name == "shapes" and chat.pipe.domain == "shapes"
    assert OmniGen2ChatPipeline(chat.pipe, reflection="prompted").reflection_protocol is PROMPTED
    chat.pipe.save_pretrained(tmp_path / "saved")  # the names survive a save
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert (saved["omnigen2_reflection"], saved["omnigen2_domain"]) == ("shapes", "shapes")


def no_cats(prompt: str) -> str | None:
    """A domain check for the test below: warns on cats."""
    return "this model knows no cats" if "cat" in prompt else None


def test_domain_warning_comes_from_the_registered_check(tiny_pipe, monkeypatch):
    """The generation pipeline's hook calls whatever check the checkpoint's domain name is registered to."""
    import warnings

    entry = EntryPoint(name="no-cats", value=f"{__name__}:no_cats", group="omnigen2.domains")
    real = loading._entry_points
    monkeypatch.setattr(
        loading, "_entry_points", lambda group: (*real(group), *((("no-cats", entry),) if "domain" in group else ()))
    )
    monkeypatch.setitem(tiny_pipe._model_index_extra, "omnigen2_domain", "no-cats")
    kw = dict(height=64, width=64, num_inference_steps=1, output_type="latent")
    with pytest.warns(UserWarning, match="knows no cats") as record:
        tiny_pipe(prompt=["a dog", "a cat"], latents=torch.zeros(2, 4, 16, 16), **kw)
    assert [w.filename for w in record if "cats" in str(w.message)] == [__file__]  # names the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_pipe(prompt="a dog", latents=torch.zeros(1, 4, 16, 16), **kw)


# -- the prompted protocol in the chat, on the official-tiny checkpoint ------------------------------------------


@pytest.fixture
def chat(tiny_pipe):
    chat = OmniGen2ChatPipeline(tiny_pipe)
    assert chat.reflection_protocol is PROMPTED  # the checkpoint names no protocol
    return chat


@pytest.fixture
def judge_says(chat, monkeypatch):
    """Script the MLLM's judgements: each judging pass (no assistant prefix) is forced, token by token, to answer
    the next scripted text. Returns (answers to fill, what each judging pass was shown and its token limit)."""
    answers, seen = [], []
    real, tok = chat.run_mllm, chat.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def run_mllm(ids, vision, assistant_prefix="", *args, **kwargs):
        if assistant_prefix or not answers:
            return real(ids, vision, assistant_prefix, *args, **kwargs)
        seen.append((tok.decode(ids[0]), kwargs["max_new_tokens"]))
        tokens = [*tok(answers.pop(0), add_special_tokens=False).input_ids, end]
        kwargs.update(max_new_tokens=len(tokens), logits_processor=script(tokens))
        return real(ids, vision, **kwargs)

    monkeypatch.setattr(chat, "run_mllm", run_mllm)
    return answers, seen


def test_prompted_judge_scores_by_the_greedy_verdict(chat, judge_says, tiny_pipe):
    from PIL import Image

    answers, seen = judge_says
    image = Image.new("RGB", (64, 64), "red")
    answers[:] = ["**Verdict:** MATCH", f"Verdict: MISMATCH\nReason: red\nInstruction: {FIX}", "hmm"]
    results = [chat.judge_scored(image, "a blue circle") for _ in range(3)]
    assert [s for _, s in results] == [1.0, -1.0, -math.inf]
    assert results[0][0] == "**Verdict:** MATCH"  # the answer as decoded
    assert all(PROMPTED.question("a blue circle") in shown and limit == 160 for shown, limit in seen)


def test_prompted_reflection_repairs_with_the_instruction(chat, judge_says, monkeypatch):
    answers, seen = judge_says
    spy = Spy(chat.pipe)
    monkeypatch.setattr(chat, "pipe", spy)
    answers[:] = [
        f"**Verdict:** MISMATCH\n**Reason:** the circle is red\n**Instruction:** {FIX}",
        "Verdict: MATCH\nReason: none\nInstruction: none",
    ]
    prompt = "Draw a blue circle."
    out = chat(prompt, assistant_prefix="<|img|>", reflect=3, generator=torch.Generator().manual_seed(0), **KW)
    first, second = out.rounds
    assert (first.verdict, first.problem, first.fix) == ("mismatch", "the circle is red", FIX)
    assert first.question == second.question == PROMPTED.question(prompt)
    assert spy.calls[1]["prompt"] == FIX and spy.calls[1]["input_images"] == [first.judged]
    assert second.judged is first.image and second.verdict == "match" and out.kept == 1
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(first.image))
    assert len(seen) == 2 and all(PROMPTED.question(prompt) in shown for shown, _ in seen)

    # an answer the protocol cannot read ends the loop, and the drawing is kept
    answers[:] = ["The image shows a circle."]
    out = chat(prompt, assistant_prefix="<|img|>", reflect=3, generator=torch.Generator().manual_seed(0), **KW)
    assert [r.verdict for r in out.rounds] == ["unparsed"] and out.kept == 0


def test_prompted_candidates_tie_and_keep_the_first(chat, judge_says, monkeypatch):
    """Without verdict texts to score, candidates with the same verdict tie: the first drawn is taken."""
    answers, _ = judge_says
    mismatch = f"MISMATCH\nReason: red\nInstruction: {FIX}"
    answers[:] = [mismatch, "MATCH", "MATCH"]
    gen = torch.Generator().manual_seed(0)
    out = chat("Draw a blue circle.", assistant_prefix="<|img|>", reflect=1, reflect_candidates=2, generator=gen, **KW)
    first = out.rounds[0]
    assert first.candidate_verdicts == ["match", "match"] and first.candidate_scores == [1.0, 1.0]
    assert first.image is first.candidates[0] and out.kept == 1
