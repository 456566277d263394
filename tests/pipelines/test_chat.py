"""The chat pipeline on the official-tiny checkpoint: one MLLM pass conditions the image (against the original's
second pass), stop tokens, multi-turn history, the reflection loop, bad input and the ``chat`` command."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen2 import OmniGen2ChatPipeline
from omnigen2.images import ImageError
from omnigen2.pipelines.pipeline_chat import Turn, image_slot
from omnigen2.shapes.protocol import parse_reflection
from omnigen2.shapes.tasks import MATCHES, REFLECT_QUESTION, make_case
from tests.pipelines.spy import Spy, script

KW = dict(height=64, width=64, num_inference_steps=2)
ORIGINAL_SYSTEM = "You are a helpful assistant that generates high-quality images based on user instructions."
MISMATCH_ANSWER = "the image does not match the instruction: the red circle should be blue. make the red circle blue"


@pytest.fixture
def chat(tiny_pipe):
    # The official-tiny checkpoint names no reflection protocol (so "prompted"); these tests script answers in the
    # Shapes protocol's sentences. tests/pipelines/test_reflection.py runs the prompted protocol on it.
    return OmniGen2ChatPipeline(tiny_pipe, reflection="shapes")


@pytest.fixture(scope="module")
def inputs(official_tiny):
    return {n: Image.open(official_tiny / "cases" / f"{n}.png").convert("RGB") for n in ("in_a", "in_b", "in_c")}


def ban(token_ids):
    def proc(step, answer, logits):
        logits = logits.clone()
        logits[0, list(token_ids)] = -torch.inf
        return logits

    return proc


def pil_to_pixels(image) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def seed(s=0):
    return torch.Generator().manual_seed(s)


# -- the original's computations, written out as it does them ---------------------------------------------------


def original_vision_processor(official_tiny):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = json.loads((official_tiny / "checkpoint" / "processor" / "preprocessor_config.json").read_text())
    return Qwen2VLImageProcessorPil(
        **{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    )


def original_inputs(pipe, official_tiny, prompt, images):
    """The original chat pipeline's prompt (``_apply_chat_template``) through the Qwen processor: each
    ``<|image_pad|>`` expanded to the image's merged patch count."""
    text = "".join(f"<img{i}>: <|vision_start|><|image_pad|><|vision_end|>" for i in range(1, len(images) + 1))
    text = f"<|im_start|>system\n{ORIGINAL_SYSTEM}<|im_end|>\n<|im_start|>user\n{text}{prompt}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    vision = {}
    if images:
        proc = original_vision_processor(official_tiny)
        vision = dict(proc(images=images, return_tensors="pt"))
        counts = iter((vision["image_grid_thw"].prod(-1) // proc.merge_size**2).tolist())
        text = re.sub(re.escape("<|image_pad|>"), lambda _: "<|image_pad|>" * next(counts), text)
    return pipe.tokenizer(text, return_tensors="pt").input_ids, vision


@torch.no_grad()
def original_second_pass(pipe, ids, vision):
    """``_get_qwen2_prompt_embeds``: one full MLLM call over prompt + answer-before-<|img|>, last hidden states,
    the image-pad rows dropped."""
    mask = torch.ones_like(ids)
    extra = {}
    if vision:
        extra = dict(vision, mm_token_type_ids=(ids == pipe.mllm.config.image_token_id).int())
    hidden = pipe.mllm(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra).hidden_states[-1]
    keep = (ids != pipe.mllm.config.image_token_id) & mask.bool()
    return hidden[0, keep[0]][None], torch.ones(1, int(keep.sum()), dtype=torch.long)


@torch.no_grad()
def original_negative(pipe, negative_prompt=""):
    ids, _ = original_inputs(pipe, None, negative_prompt, [])
    out = pipe.mllm(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[-1], torch.ones_like(ids)


# -- the single pass --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [(), ("in_a", "in_c")], ids=["text-only", "two-images"])
def test_conditioning_equals_original_second_pass(chat, inputs, official_tiny, names):
    """The issue bar: the states reused from the generation pass equal the original's second MLLM pass over the
    same tokens (prompt + the answer before <|img|>), fp32, within 1e-5."""
    images = [inputs[n] for n in names]
    tok = chat.tokenizer
    answer = tok("a red circle, please.", add_special_tokens=False).input_ids
    img_id = tok.convert_tokens_to_ids("<|img|>")
    out = chat("Draw a red circle.", images, logits_processor=script([*answer, img_id]), generator=seed(), **KW)
    assert out.text == tok.decode(answer) + "<|img|>" and len(out.images) == 1

    prompt_ids, vision = original_inputs(chat.pipe, official_tiny, "Draw a red circle.", images)
    assert torch.equal(out.input_ids, torch.cat([prompt_ids, torch.tensor([answer])], dim=1))  # <|img|> not fed
    ref, ref_mask = original_second_pass(chat.pipe, out.input_ids, vision)
    diff = (out.prompt_embeds - ref).abs().max().item()
    print(f"conditioning max abs diff ({len(names)} images): {diff:.3e}")
    assert out.prompt_embeds.shape == ref.shape and torch.equal(out.prompt_attention_mask, ref_mask)
    assert diff <= 1e-5


def test_image_equals_generation_pipeline_with_same_conditioning(chat, tiny_pipe, inputs):
    """The drawing is OmniGen2Pipeline's output for that conditioning (and the original chat negative), with the
    input image as reference and all three guidance branches."""
    kw = dict(KW, text_guidance_scale=2.0, image_guidance_scale=1.5)
    out = chat("Make it blue.", [inputs["in_b"]], assistant_prefix="<|img|>", generator=seed(3), output_type="pt", **kw)
    neg, neg_mask = original_negative(tiny_pipe)
    ref = tiny_pipe(
        prompt_embeds=out.prompt_embeds,
        prompt_attention_mask=out.prompt_attention_mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        input_images=[inputs["in_b"]],
        generator=seed(3),
        output_type="pt",
        **kw,
    ).images
    diff = (out.images - ref).abs().max().item()
    print(f"image max abs diff: {diff:.3e}")
    assert out.images.shape == (1, 3, 80, 48) and diff <= 1e-5  # one input image sets the size (48 x 80)
    pil = chat("Make it blue.", [inputs["in_b"]], assistant_prefix="<|img|>", generator=seed(3), **kw).images[0]
    assert pil.size == (48, 80)


# -- decoding and stop tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_text_answer_stops_at_stop_token(chat, stop):
    tok = chat.tokenizer
    words = tok("a blue square", add_special_tokens=False).input_ids
    out = chat("What is this?", logits_processor=script([*words, tok.convert_tokens_to_ids(stop), *words]))
    assert out.text == "a blue square" and out.images == [] and out.prompt_embeds is None
    assert out.input_ids.shape[1] == chat.build_inputs([Turn("What is this?")])[0].shape[1] + len(words)


def test_decoding_raises_no_deprecation_warning(chat):
    """Every decode step passes the KV cache under the name the installed transformers expects."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = chat("Hello.", max_new_tokens=3, logits_processor=ban(chat.stop_ids))
    assert len(out.input_ids[0]) > 0 and chat._cache_kwarg in ("cache", "past_key_values")


def test_max_new_tokens_and_prefix(chat):
    stops = chat.stop_ids
    out = chat("Hello.", max_new_tokens=3, logits_processor=ban(stops))
    assert len(chat.tokenizer(out.text, add_special_tokens=False).input_ids) >= 1 and out.images == []
    assert out.input_ids.shape[1] == chat.build_inputs([Turn("Hello.")])[0].shape[1] + 2  # the last is not fed
    out = chat("Hello.", assistant_prefix="Sure", max_new_tokens=0)
    assert out.text == "Sure"
    chat.reset()
    out = chat("Draw.", assistant_prefix="<|img|>", generator=seed(), **KW)  # draws without decoding
    assert out.text == "<|img|>" and len(out.images) == 1
    assert out.prompt_embeds.shape[1] == chat.build_inputs([Turn("Draw.")])[0].shape[1]


def test_sampling_is_reproducible_with_a_generator(chat):
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, logits_processor=ban(chat.stop_ids))
    a = chat("Hi.", generator=seed(1), **kw).text
    b = chat("Hi.", generator=seed(1), **kw).text
    c = chat("Hi.", generator=seed(2), **kw).text
    assert a == b and a != c


def test_greedy_decoding_equals_transformers_generate(chat, inputs):
    """The KV-cached decode (our 3D positions) picks what transformers' own generate picks."""
    ids, vision = chat.build_inputs([Turn("What is this?", [inputs["in_c"]])])
    ours = chat.run_mllm(ids, vision, max_new_tokens=8, logits_processor=ban(chat.stop_ids)).answer_ids
    bad = [[t] for t in chat.stop_ids]
    ref = chat.mllm.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == chat.image_token_id).int(),
        max_new_tokens=8,
        do_sample=False,
        bad_words_ids=bad,
        pad_token_id=0,
        **vision,
    )
    assert ours == ref[0, ids.shape[1] :].tolist()


# -- history ----------------------------------------------------------------------------------------------------


def test_multi_turn_history_carries_images(chat, inputs):
    tok = chat.tokenizer
    pad = chat.image_token_id
    first = chat("What is this?", [inputs["in_a"]], logits_processor=script(tok("a circle<|im_end|>").input_ids))
    n_a = int((first.input_ids == pad).sum())
    assert first.text == "a circle" and n_a > 0

    second = chat("Draw it bigger.", assistant_prefix="<|img|>", generator=seed(), **KW)
    text = tok.decode(second.input_ids[0])
    assert "<img1>: <|vision_start|>" in text and "What is this?" in text and "a circle<|im_end|>" in text
    assert int((second.input_ids == pad).sum()) == n_a  # the earlier image is still seen through the ViT
    assert second.prompt_embeds.shape[1] == int((second.input_ids != pad).sum())  # pads dropped, history kept

    third = chat("Thanks.", max_new_tokens=1)
    text = tok.decode(third.input_ids[0])
    assert "Draw it bigger.<|im_end|>\n<|im_start|>assistant\n<|img|><img2>: <|vision_start|>" in text
    assert int((third.input_ids == pad).sum()) > n_a  # plus the drawn image
    assert [len(t.images) for t in chat.history] == [1, 0, 0] and chat.history[1].generated == second.images

    chat.reset()
    assert chat.history == []
    assert not (chat("Hi.", max_new_tokens=1).input_ids == pad).any()


# -- reflection -------------------------------------------------------------------------------------------------


def test_parse_reflection():
    assert parse_reflection(MATCHES) == ("match", None, None)
    assert parse_reflection("The image matches the instruction") == ("match", None, None)
    assert parse_reflection(MISMATCH_ANSWER) == (
        "mismatch",
        "the red circle should be blue",
        "make the red circle blue",
    )
    case = make_case("reflection", "missing", 3)
    verdict, problem, fix = parse_reflection(case.answer)
    assert verdict == "mismatch" and case.answer.endswith(f"{problem}. {fix}")
    for bad in ("blue", "", "the image does not match the instruction: wrong", "the image does not match"):
        assert parse_reflection(bad) == ("unparsed", None, None)


@pytest.fixture
def scripted(chat, monkeypatch):
    """Replace the judge by scripted answers (score 0); return (asked, set_answers, spy)."""
    asked, answers = [], []
    spy = Spy(chat.pipe)
    monkeypatch.setattr(chat, "pipe", spy)

    def judge_scored(image, instruction, max_new_tokens=64):
        asked.append((image, instruction))
        return (answers.pop(0) if len(answers) > 1 else answers[0]), 0.0

    monkeypatch.setattr(chat, "judge_scored", judge_scored)
    return asked, answers, spy


def draw(chat, reflect):
    return chat("Draw a blue circle.", assistant_prefix="<|img|>", reflect=reflect, generator=seed(), **KW)


def test_reflection_stops_on_match(chat, scripted):
    asked, answers, spy = scripted
    answers[:] = [MATCHES]
    out = draw(chat, reflect=3)
    assert [r.verdict for r in out.rounds] == ["match"] and len(spy.calls) == 1  # drawn, judged, kept
    assert out.rounds[0].question == REFLECT_QUESTION.format(instruction="Draw a blue circle.")
    assert asked == [(out.rounds[0].judged, "Draw a blue circle.")]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(out.rounds[0].judged))


def test_reflection_edits_with_the_fix_then_judges_again(chat, scripted):
    asked, answers, spy = scripted
    answers[:] = [MISMATCH_ANSWER, MATCHES]
    out = draw(chat, reflect=3)
    first, second = out.rounds
    assert (first.verdict, first.problem, first.fix) == ("mismatch", "the red circle should be blue", first.fix)
    edit = spy.calls[1]
    assert edit["prompt"] == "make the red circle blue" and edit["input_images"] == [first.judged]
    assert second.judged is first.image and second.verdict == "match" and second.image is None
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(first.image))  # the accepted repair is returned
    assert out.kept == 1
    assert chat.history[-1].generated == out.images and len(asked) == 2


def test_reflection_respects_n_and_judges_the_last_repair(chat, scripted):
    asked, answers, spy = scripted
    answers[:] = [MISMATCH_ANSWER]  # never satisfied
    out = draw(chat, reflect=2)
    # two repairs (three generation calls with the drawing), each judged: three judgements
    assert [r.verdict for r in out.rounds] == ["mismatch"] * 3 and len(spy.calls) == 3 and len(asked) == 3
    assert out.rounds[1].judged is out.rounds[0].image and out.rounds[2].judged is out.rounds[1].image
    assert out.rounds[2].image is None and out.rounds[2].fix == "make the red circle blue"  # no third repair
    # no repair was accepted: the drawing is returned, not a repair the MLLM itself rejected
    assert out.kept == 0 and np.array_equal(np.asarray(out.images[0]), np.asarray(out.rounds[0].judged))
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.rounds[1].image))
    asked.clear()
    assert draw(chat, reflect=0).rounds == [] and asked == []  # reflect=0 does not judge


def test_reflection_keeps_the_repair_judged_a_match(chat, scripted):
    asked, answers, spy = scripted
    answers[:] = [MISMATCH_ANSWER, MISMATCH_ANSWER, MATCHES]
    out = draw(chat, reflect=3)
    assert [r.verdict for r in out.rounds] == ["mismatch", "mismatch", "match"] and len(spy.calls) == 3
    assert out.kept == 2 and np.array_equal(np.asarray(out.images[0]), np.asarray(out.rounds[1].image))
    assert chat.history[-1].generated == out.images
    # an unparsed judgement of a repair ends the loop and does not accept it
    answers[:] = [MISMATCH_ANSWER, "a circle, maybe"]
    out = draw(chat, reflect=3)
    assert [r.verdict for r in out.rounds] == ["mismatch", "unparsed"] and out.kept == 0


def test_reflection_stops_on_unparsed_answer(chat, scripted):
    asked, answers, spy = scripted
    answers[:] = ["a circle, maybe"]
    out = draw(chat, reflect=3)
    assert [(r.verdict, r.answer) for r in out.rounds] == [("unparsed", "a circle, maybe")] and len(spy.calls) == 1


@pytest.fixture
def scored(chat, monkeypatch):
    """Replace the judge by scripted (answer, score) pairs; return (asked, set_answers, spy). Each judgement pops
    the next scripted pair."""
    asked, answers = [], []
    spy = Spy(chat.pipe)
    monkeypatch.setattr(chat, "pipe", spy)

    def judge_scored(image, instruction, max_new_tokens=64):
        asked.append(image)
        return answers.pop(0)

    monkeypatch.setattr(chat, "judge_scored", judge_scored)
    return asked, answers, spy


def draw_k(chat, reflect, k):
    return chat(
        "Draw a blue circle.",
        assistant_prefix="<|img|>",
        reflect=reflect,
        reflect_candidates=k,
        generator=seed(),
        **KW,
    )


def test_reflection_candidates_keep_the_best_scored_match(chat, scored):
    asked, answers, spy = scored
    answers[:] = [(MISMATCH_ANSWER, -1.0), (MATCHES, 0.5), (MISMATCH_ANSWER, 4.0), (MATCHES, 3.0)]
    out = draw_k(chat, reflect=3, k=3)
    first, second = out.rounds
    edit = spy.calls[1]
    assert edit["num_images_per_prompt"] == 3 and edit["input_images"] == [first.judged]
    assert len(first.candidates) == 3 and first.candidate_verdicts == ["match", "mismatch", "match"]
    assert first.candidate_scores == [0.5, 4.0, 3.0]
    # the match scored highest is the repair: not the first match, nor a higher-scored mismatch
    assert first.image is first.candidates[2] and second.judged is first.candidates[2]
    assert second.verdict == "match" and len(asked) == 4 and len(spy.calls) == 2  # its judgement is not repeated
    assert out.kept == 1 and np.array_equal(np.asarray(out.images[0]), np.asarray(first.candidates[2]))


def test_reflection_candidates_continue_from_the_best_scored(chat, scored):
    asked, answers, spy = scored
    rejected = [(MISMATCH_ANSWER, s) for s in (-3.0, -0.5, -2.0)]
    answers[:] = [(MISMATCH_ANSWER, -1.0), *rejected, *rejected]
    out = draw_k(chat, reflect=2, k=3)
    assert [r.verdict for r in out.rounds] == ["mismatch"] * 3 and len(spy.calls) == 3 and len(asked) == 7
    assert out.rounds[0].image is out.rounds[0].candidates[1]  # the highest match score
    assert spy.calls[2]["input_images"] == [out.rounds[0].candidates[1]]  # the next repair starts from it
    assert out.kept == 0 and out.rounds[2].candidates == []  # no repair accepted: the drawing is returned


def test_reflection_candidates_default_to_the_checkpoints(chat, scored, monkeypatch):
    asked, answers, spy = scored
    answers[:] = [(MISMATCH_ANSWER, 0.0), (MATCHES, 1.0), (MATCHES, 1.0)]
    monkeypatch.setitem(spy.pipe.sampling_defaults, "reflect_candidates", 2)
    out = chat("Draw a blue circle.", assistant_prefix="<|img|>", reflect=1, generator=seed(), **KW)
    assert spy.calls[1]["num_images_per_prompt"] == 2 and len(out.rounds[0].candidates) == 2
    answers[:] = [(MISMATCH_ANSWER, 0.0), (MATCHES, 1.0)]
    out = draw_k(chat, reflect=1, k=1)  # the call's value wins
    assert spy.calls[-1]["num_images_per_prompt"] == 1 and out.rounds[0].candidates == []


def test_reflection_first_candidate_is_the_single_repair(chat, scored):
    """k candidates are one batch of k noises from the same generator: the first is the repair k=1 draws."""
    asked, answers, spy = scored
    answers[:] = [(MISMATCH_ANSWER, 0.0)] * 6  # 2 judgements with one candidate, 1 + 3 with three
    single = draw_k(chat, reflect=1, k=1).rounds[0]
    chat.reset()  # the same one-turn conversation, so the same drawing to repair
    batch = draw_k(chat, reflect=1, k=3).rounds[0]
    assert single.candidates == [] and len(batch.candidates) == 3 and batch.image is batch.candidates[0]
    assert torch.allclose(batch.pixels, single.pixels, atol=1e-5)
    assert not torch.allclose(batch.pixels, pil_to_pixels(batch.candidates[1]), atol=1e-2)  # other noises


def test_judge_asks_in_a_fresh_conversation(chat, inputs):
    """The real judge: one image and REFLECT_QUESTION, in the understanding-training template."""
    from omnigen2.shapes.pretrain import UnderstandingBatcher

    chat("Hi.", max_new_tokens=1)  # history must not leak into the judging conversation
    question = REFLECT_QUESTION.format(instruction="a red circle")
    ids, vision = chat.build_inputs([Turn(question, [inputs["in_a"]])])
    n = int((ids == chat.image_token_id).sum())
    trained = UnderstandingBatcher(chat.tokenizer, chat.vision_processor).prompt(question, n)
    assert chat.tokenizer.decode(ids[0]) == trained and trained.count(image_slot(1, n)) == 1
    with chat.answering():  # the judge's answer is the greedy answer to exactly these inputs
        greedy = chat.run_mllm(ids, vision, max_new_tokens=3).answer_ids
    expected = chat.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert len(greedy) == 3 and chat.judge(inputs["in_a"], "a red circle", max_new_tokens=3) == expected


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_input(chat, inputs):
    with pytest.raises(ValueError, match="at most 5"):
        chat("Combine.", [inputs["in_a"]] * 6)
    with pytest.raises(ImageError, match="input image 1"):
        chat("Combine.", [inputs["in_a"], "in_b.png"])
    with pytest.raises(TypeError, match="one turn"):
        chat(["a", "b"])
    with pytest.raises(TypeError, match="sets prompt_embeds"):
        chat("Hi.", prompt_embeds=None)
    with pytest.raises(ValueError, match="output_type"):
        chat("Hi.", output_type="latent")
    with pytest.raises(ValueError, match="reflect"):
        chat("Hi.", reflect=-1)
    with pytest.raises(ValueError, match="reflect_candidates"):
        chat("Hi.", reflect_candidates=0)
    assert chat.history == []  # nothing recorded for refused turns


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_chat(official_tiny, tmp_path, capsys):
    from omnigen2.cli import main

    model = ["--model", str(official_tiny / "checkpoint")]
    base = ["--steps", "2", "--height", "64", "--width", "64", "--max-new-tokens", "4"]
    rc = main(
        ["chat", "Draw a red circle.", *model, *base, "--force-image", "--reflect", "1", "-o", str(tmp_path / "x")]
        + ["--reflect-candidates", "2"]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "answer: <|img|>" in printed and "reflection 1:" in printed
    assert Image.open(tmp_path / "x.png").size == (64, 64)

    rc = main(
        [
            "chat",
            "Edit it.",
            "-i",
            str(official_tiny / "cases" / "in_b.png"),
            *model,
            *base,
            "--force-image",
            "-o",
            str(tmp_path),
        ]
    )
    assert rc == 0 and Image.open(tmp_path / "chat.png").size == (48, 80)

    assert main(["chat", "Hello.", *model, *base]) == 0 and capsys.readouterr().out.startswith("answer: ")

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["chat", "x", "-i", str(bad), *model]) == 2
    assert main(["chat", "x", "-i", str(tmp_path / "missing.png"), *model]) == 2
    assert main(["chat", "x", *["-i", str(official_tiny / "cases" / "in_a.png")] * 6, *model]) == 2
    err = capsys.readouterr().err
    assert "not a readable image" in err and "does not exist" in err and "at most 5" in err


# -- the reflection adapter -------------------------------------------------------------------------------------


def test_answering_adapter_is_on_only_for_answers(official_tiny, tmp_path, inputs):
    """A trained adapter round-trips through the checkpoint, changes what the judge answers, and leaves the
    image conditioning (and the base MLLM) exactly as without it."""
    from omnigen2 import OmniGen2Pipeline
    from omnigen2.shapes.pretrain import UnderstandingBatcher
    from omnigen2.shapes.reflection import train_reflection_adapter

    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    base = OmniGen2ChatPipeline(pipe)
    before = {k: v.clone() for k, v in pipe.mllm.state_dict().items()}
    batcher = UnderstandingBatcher(pipe.tokenizer, base.vision_processor)
    examples = [([inputs["in_a"]], REFLECT_QUESTION.format(instruction="a red circle"), MATCHES)] * 4
    torch.manual_seed(0)
    adapter, losses = train_reflection_adapter(pipe.mllm, batcher, examples, steps=6, batch_size=2, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in pipe.mllm.state_dict().items())  # a copy was trained
    assert adapter["state_dict"] and all("lora_" in k for k in adapter["state_dict"])

    pipe.reflection_adapter = adapter
    pipe.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "mllm_reflection" / "adapter_model.safetensors").is_file()
    with_adapter = OmniGen2ChatPipeline.from_pretrained(tmp_path / "ckpt")
    with_adapter.set_progress_bar_config(disable=True)
    loaded = with_adapter.pipe.reflection_adapter["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in adapter["state_dict"].items())

    kw = dict(assistant_prefix="<|img|>", **KW)
    a, b = base("a red circle", generator=seed(), **kw), with_adapter("a red circle", generator=seed(), **kw)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)  # the adapter is off for the drawing pass
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    ids, vision = base.build_inputs([Turn(REFLECT_QUESTION.format(instruction="a red circle"), [inputs["in_a"]])])
    plain = base.run_mllm(ids, vision, max_new_tokens=0).hidden
    with with_adapter.answering():
        judged = with_adapter.run_mllm(ids, vision, max_new_tokens=0).hidden
    assert (plain - judged).abs().max() > 1e-4  # ... and on while judging
    assert torch.equal(with_adapter.run_mllm(ids, vision, max_new_tokens=0).hidden, plain)  # off again after

    # A text answer is decoded with the adapter on; a drawn one (above) with it off.
    kw = dict(max_new_tokens=6, logits_processor=ban([with_adapter.img_token_id]))
    with_adapter.reset()
    ids, vision = with_adapter.build_inputs([Turn("what is this?", [inputs["in_a"]])])
    with with_adapter.answering():
        adapted = with_adapter.run_mllm(ids, vision, **kw)
    plain_answer = with_adapter.run_mllm(ids, vision, **kw)
    n = ids.shape[1]  # the conversation's positions (the answers may differ in length)
    assert (adapted.hidden[:, :n] - plain_answer.hidden[:, :n]).abs().max() > 1e-4
    out = with_adapter("what is this?", [inputs["in_a"]], **kw)
    assert torch.equal(out.input_ids, adapted.input_ids) and out.text == with_adapter._decode_text(adapted.answer_ids)
