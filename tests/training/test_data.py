"""Training data: records, mixes with ratios, bad records with file:line, preprocessing and dropout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from omnigen2.pipelines.pipeline_omnigen2 import SYSTEM_PROMPT
from omnigen2.training.data import DataConfig, DataError, MixtureDataset, load_source

from .conftest import draw


@pytest.fixture(scope="module")
def tokenizer(official_tiny):
    return AutoTokenizer.from_pretrained(official_tiny / "checkpoint" / "processor")


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_bad_records_are_reported_with_file_and_line(tmp_path, tokenizer):
    draw(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = {"task_type": "t2i", "instruction": "a dot", "output_image": "ok.png"}
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            good,
            {"task_type": "t2i", "instruction": "missing", "output_image": "nope.png"},  # line 2
            {"task_type": "t2i", "instruction": "corrupt", "output_image": "corrupt.png"},  # line 3
            {"task_type": "ic", "instruction": "six", "input_images": ["ok.png"] * 6, "output_image": "ok.png"},  # 4
            {"task_type": "t2i", "instruction": "  ", "output_image": "ok.png"},  # 5
            "{not json",  # 6
            {"task_type": "video", "instruction": "x", "output_image": "ok.png"},  # 7
            {"task_type": "t2i", "instruction": "x"},  # 8
        ],
    )
    ds = MixtureDataset(DataConfig(path=str(tmp_path / "d.jsonl")), tokenizer)
    assert len(ds) == 1
    where = {b.where.rsplit(":", 1)[1]: b.reason for b in ds.bad}
    assert set(where) == {"2", "3", "4", "5", "6", "7", "8"}
    assert all(b.where.startswith(str(tmp_path / "d.jsonl") + ":") for b in ds.bad)
    assert "does not exist" in where["2"] and "not a readable image" in where["3"]
    assert "at most 5" in where["4"] and "empty instruction" in where["5"] and "invalid JSON" in where["6"]
    assert "task_type" in where["7"] and "output_image" in where["8"]
    assert "7 bad records" in ds.report()


def test_all_bad_is_an_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"task_type": "t2i", "instruction": "x", "output_image": "no.png"}])
    with pytest.raises(DataError, match="no usable records"):
        MixtureDataset(DataConfig(path=str(tmp_path / "d.jsonl")), tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_source(tmp_path / "missing.yml")


def make_mix(tmp_path, ratios=(3, 1, 1)):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        draw(tmp_path / name / "x.png", (5, 5, 5))
        write_jsonl(
            tmp_path / name / "r.jsonl",
            [{"task_type": "t2i", "instruction": f"{name} {i}", "output_image": "x.png"} for i in range(4)],
        )
    (tmp_path / "inner.yml").write_text(
        f"data:\n  - {{path: b/r.jsonl, ratio: {ratios[1]}}}\n  - {{path: c, ratio: {ratios[2]}}}\n"
    )
    (tmp_path / "mix.yml").write_text(
        f"data:\n  - {{path: a/r.jsonl, ratio: {ratios[0]}}}\n  - {{path: inner.yml, ratio: 2}}\n"
    )
    return tmp_path / "mix.yml"


def test_mix_ratios_are_honoured(tmp_path, tokenizer):
    """a: 3/5; the nested mix gets 2/5, split 1:1 between b and c -> 0.6, 0.2, 0.2."""
    ds = MixtureDataset(DataConfig(path=str(make_mix(tmp_path)), check_images=False), tokenizer, seed=1)
    np.testing.assert_allclose(ds.weights, [0.6, 0.2, 0.2])
    counts = np.bincount([ds.draw(step, pos)[0] for step in range(500) for pos in range(8)], minlength=3)
    freq = counts / counts.sum()
    assert np.abs(freq - [0.6, 0.2, 0.2]).max() < 0.05, freq
    # relative paths resolved against each file: every record points at an existing image
    assert all(r.output_image.endswith("x.png") for src in ds.sources for r in src)


def test_sampling_is_deterministic(four_samples, tokenizer):
    cfg = DataConfig(path=str(four_samples / "data.jsonl"), prompt_dropout=0.5, ref_image_dropout=0.5)
    a, b = MixtureDataset(cfg, tokenizer, seed=3), MixtureDataset(cfg, tokenizer, seed=3)
    for step in range(5):
        x, y = a.sample(step, 1), b.sample(step, 1)
        assert x["text"] == y["text"] and x["where"] == y["where"] and (x["target"] == y["target"]).all()
    c = MixtureDataset(cfg, tokenizer, seed=4)
    assert [a.draw(s, 0) for s in range(20)] != [c.draw(s, 0) for s in range(20)]


def test_dropout_uses_the_inference_negative_template(four_samples, tokenizer):
    cfg = DataConfig(path=str(four_samples / "data.jsonl"), prompt_dropout=1.0, ref_image_dropout=0.0)
    ds = MixtureDataset(cfg, tokenizer)
    empty = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ""}], tokenize=False
    )
    for step in range(8):
        s = ds.sample(step, 0)
        assert s["text"] == empty
        src, idx = ds.draw(step, 0)
        assert len(s["refs"]) == len(ds.sources[src][idx].input_images)  # references kept (the "ref" branch)
    ds_all = MixtureDataset(DataConfig(path=cfg.path, prompt_dropout=1.0, ref_image_dropout=1.0), tokenizer)
    assert all(ds_all.sample(s, 0)["refs"] == [] for s in range(8))  # the unconditional branch
    ds_none = MixtureDataset(DataConfig(path=cfg.path, prompt_dropout=0.0, ref_image_dropout=1.0), tokenizer)
    # references are only dropped together with the prompt, as the guidance branches at inference
    for step in range(8):
        src, idx = ds_none.draw(step, 0)
        assert len(ds_none.sample(step, 0)["refs"]) == len(ds_none.sources[src][idx].input_images)


def test_generation_prompt_share(four_samples, tokenizer):
    """With generation_prompt_prob the text ends with the assistant turn, as a chat turn answering <|img|>."""
    path = str(four_samples / "data.jsonl")
    plain = MixtureDataset(DataConfig(path=path), tokenizer)
    always = MixtureDataset(DataConfig(path=path, generation_prompt_prob=1.0), tokenizer)
    half = MixtureDataset(DataConfig(path=path, generation_prompt_prob=0.5), tokenizer)
    suffix = "<|im_start|>assistant\n"
    for step in range(10):
        a, b = plain.sample(step, 0, load=False)["text"], always.sample(step, 0, load=False)["text"]
        assert not a.endswith(suffix) and b == a + suffix
    share = np.mean([half.sample(s, 0, load=False)["text"].endswith(suffix) for s in range(400)])
    assert 0.4 < share < 0.6, share


def test_chat_images_flags_chat_form_samples_with_inputs(four_samples, tokenizer):
    """chat_images marks the chat-form samples that have input images and a prompt: those a chat turn shows
    the MLLM; text-to-image, plain-form and dropped-prompt samples keep the instruction-only encoding."""
    path = str(four_samples / "data.jsonl")
    flags = lambda **kw: [  # noqa: E731
        MixtureDataset(DataConfig(path=path, **kw), tokenizer).sample(s, 0, load=False) for s in range(40)
    ]
    on = flags(generation_prompt_prob=1.0, chat_images=True)
    assert all(s["chat_images"] == bool(s["refs"]) for s in on) and any(s["chat_images"] for s in on)
    assert not any(s["chat_images"] for s in flags(generation_prompt_prob=1.0))
    assert not any(s["chat_images"] for s in flags(chat_images=True))  # never in the plain form
    dropped = flags(generation_prompt_prob=1.0, chat_images=True, prompt_dropout=1.0)
    assert any(s["refs"] for s in dropped) and not any(s["chat_images"] for s in dropped)
    assert on[0]["instruction"] in on[0]["text"]


def test_caption_prefix_dropping(four_samples, tokenizer):
    keep = MixtureDataset(DataConfig(path=str(four_samples / "data.jsonl"), caption_prefix_drop=0.0), tokenizer)
    drop = MixtureDataset(DataConfig(path=str(four_samples / "data.jsonl"), caption_prefix_drop=1.0), tokenizer)
    for step in range(20):
        if keep.sources[0][keep.draw(step, 0)[1]].instruction.startswith("The image shows"):
            assert "The image shows a red circle." in keep.sample(step, 0)["text"]
            assert (
                "The image shows" not in drop.sample(step, 0)["text"]
                and "a red circle." in drop.sample(step, 0)["text"]
            )
            return
    pytest.fail("the captioned record was never drawn")


def test_resizing_rules(tmp_path, tokenizer):
    draw(tmp_path / "big.png", (9, 9, 9), size=(300, 200))
    draw(tmp_path / "small.png", (9, 9, 9), size=(40, 24))
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"task_type": "edit", "instruction": "x", "input_images": ["big.png"], "output_image": "big.png"},
            {
                "task_type": "ic",
                "instruction": "y",
                "input_images": ["big.png", "big.png"],
                "output_image": "small.png",
            },
        ],
    )
    cfg = DataConfig(
        path=str(tmp_path / "d.jsonl"),
        max_input_pixels=[128 * 128, 64 * 64],
        max_output_pixels=96 * 96,
        max_side_length=160,
    )
    ds = MixtureDataset(cfg, tokenizer)
    seen = set()
    for step in range(30):
        s = ds.sample(step, 0)
        shapes = [tuple(r.shape) for r in s["refs"]]
        for shape in [*shapes, tuple(s["target"].shape)]:
            assert shape[1] % 16 == 0 and shape[2] % 16 == 0
        if len(shapes) == 1:  # one input: 128x128 budget and side <= 160 -> 144x96 (3:2 kept, floored to 16)
            assert shapes[0] == (3, 96, 144) and s["target"].shape == (3, 64, 112)
        else:  # two inputs: 64x64 budget each -> 48x64 (floor of 52x78); a small target is never upscaled
            assert shapes == [(3, 48, 64)] * 2 and s["target"].shape == (3, 16, 32)
        seen.add(len(shapes))
    assert seen == {1, 2}
    assert float(s["target"].min()) >= -1 and float(s["target"].max()) <= 1
