"""The cell probe (an auxiliary loss that makes the answering adapter's vision tokens keep each cell's dot, and
optionally per-shape counts summed over the tokens) and the dot-rich captions it trains with."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from omnigen2 import OmniGen2ChatPipeline, OmniGen2Pipeline
from omnigen2.shapes import judge
from omnigen2.shapes.cell_probe import (
    CLASSES,
    DOT_CLASS,
    IGNORE,
    NO_COUNT,
    NO_DOT,
    CellProbe,
    cell_labels,
    probe_labels,
)
from omnigen2.shapes.pretrain import UnderstandingBatcher
from omnigen2.shapes.reflection import train_reflection_adapter
from omnigen2.shapes.render import render
from omnigen2.shapes.tasks import cases, dotted_captions
from omnigen2.shapes.world import CELLS, SHAPES, Object, Scene


def test_cell_labels_read_each_cells_dot():
    scene = Scene((Object("square", "red", "blue", "top left"), Object("circle", "green", None, "center")), "sky")
    labels = cell_labels(render(scene, 0))
    expected = [IGNORE] * len(CELLS)
    expected[CELLS.index("top left")] = DOT_CLASS["blue"]
    expected[CELLS.index("center")] = NO_DOT
    assert labels == expected and max(DOT_CLASS.values()) == CLASSES - 1
    # An image the judge cannot read teaches nothing.
    assert cell_labels(PIL.Image.new("RGB", (64, 64), (3, 250, 7))) == [IGNORE] * len(CELLS)


def test_probe_labels_add_the_per_shape_counts():
    scene = Scene(
        (
            Object("square", "red", "blue", "top left"),
            Object("circle", "green", None, "center"),
            Object("square", "yellow", None, "bottom"),
        ),
        "sky",
    )
    labels = probe_labels(render(scene, 0))
    assert labels[: len(CELLS)] == cell_labels(render(scene, 0))
    assert labels[len(CELLS) :] == [scene.count(s) for s in SHAPES] == [1, 2, 0, 0]  # circle, square, ...
    unreadable = probe_labels(PIL.Image.new("RGB", (64, 64), (3, 250, 7)))
    assert unreadable == [IGNORE] * len(CELLS) + [NO_COUNT] * len(SHAPES)


def test_dotted_captions_are_training_captions_of_dot_rich_scenes():
    examples = dotted_captions(40, start=123)
    assert examples == dotted_captions(40, start=123)  # deterministic, rendering included
    objects = dotted = 0
    for images, question, answer in examples:
        assert question == "describe the image." and len(images) == 1 and images[0].size == (64, 64)
        scene = judge.read(images[0])
        assert scene.caption() == answer  # the caption is what the image shows
        objects += len(scene.objects)
        dotted += sum(o.dot is not None for o in scene.objects)
    assert 0.35 < dotted / objects < 0.65  # even odds, against 3 in 10 in the benchmark's captions


@pytest.fixture(scope="module")
def chat():
    pipe = OmniGen2Pipeline.from_pretrained("builtin:shapes")
    pipe.reflection_adapter = None  # a clean MLLM, as the recipe trains the adapter on
    return OmniGen2ChatPipeline(pipe)


def _lora_mllm_and_examples(chat):
    """A copy of the clean MLLM with the answering LoRA injected (only its layers train), the batcher, and four
    training understanding questions."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from omnigen2.shapes.reflection import REFLECTION_LORA

    mllm = copy.deepcopy(chat.pipe.mllm)
    inject_adapter_in_model(LoraConfig(**REFLECTION_LORA), mllm, adapter_name="probe")
    for name, p in mllm.named_parameters():
        p.requires_grad_("lora_" in name)
    batcher = UnderstandingBatcher(chat.tokenizer, chat.vision_processor)
    return mllm, batcher, [(c.input_images(), c.prompt, c.answer) for c in cases("understanding", 4, "train")]


def test_the_probe_adds_its_loss_and_trains_the_vision_tower(chat):
    mllm, batcher, examples = _lora_mllm_and_examples(chat)
    batch = batcher(examples)
    labels = torch.tensor([cell_labels(ims[0]) for ims, _, _ in examples])
    probe = CellProbe(mllm, weight=2.0)
    out = probe(cell_labels=labels, **batch)
    assert torch.allclose(out.loss, out.answer_loss + 2.0 * out.cell_loss)
    assert out.cell_loss > 0.1  # an untrained head: about log(7)
    out.cell_loss.backward()
    # LoRA's B starts at zero, so its gradient is the first to move: the tower's layers get one, the language
    # model's none (the probe reads the vision tokens only).
    moved = {n for n, p in mllm.named_parameters() if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0}
    assert any("visual.patch_embed" in n for n in moved) and any("visual.blocks" in n for n in moved)
    assert not any("language_model" in n for n in moved)
    probe.remove()
    assert not mllm.model.visual._forward_hooks


def test_the_count_term_sums_one_map_over_the_tokens_and_trains_the_tower(chat):
    mllm, batcher, examples = _lora_mllm_and_examples(chat)
    labels = torch.tensor([probe_labels(ims[0]) for ims, _, _ in examples])
    # Dots off: the count term alone.
    probe = CellProbe(mllm, weight=0.0, count_weight=0.5)
    out = probe(cell_labels=labels, **batcher(examples))
    assert float(out.cell_loss) == 0.0 and out.count_loss > 0
    assert torch.allclose(out.loss, out.answer_loss + 0.5 * out.count_loss)
    # The prediction is the head over each token, summed: what the probe regresses is additive over tokens.
    tokens = probe._tokens.reshape(len(examples), -1, probe._tokens.shape[-1])  # (4, 16, D)
    predicted = probe.count_head(tokens).sum(1)  # (4, shapes)
    expected = torch.nn.functional.mse_loss(predicted, labels[:, len(CELLS) :].float())
    assert torch.allclose(out.count_loss, expected)
    out.count_loss.backward()
    moved = {n for n, p in mllm.named_parameters() if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0}
    assert any("visual.blocks" in n for n in moved) and not any("language_model" in n for n in moved)
    # An unreadable image carries no count.
    labels[:, len(CELLS) :] = NO_COUNT
    assert not hasattr(probe(cell_labels=labels, **batcher(examples)), "count_loss")
    probe.remove()


def test_training_with_the_probe_leaves_the_mllm_alone_and_keeps_the_tower_layers(chat):
    batcher = UnderstandingBatcher(chat.tokenizer, chat.vision_processor)
    examples = [(c.input_images(), c.prompt, c.answer) for c in cases("understanding", 8, "train")]
    examples.append((None, "draw a red circle", "<|img|>"))  # an example without images carries no probe loss
    mllm = chat.pipe.mllm
    before = {k: v.clone() for k, v in mllm.state_dict().items() if "lora_" not in k}
    adapter, history = train_reflection_adapter(mllm, batcher, examples, 2, batch_size=4, cell_aux=1.0, count_aux=0.2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    keys = adapter["state_dict"].keys()
    assert any("patch_embed" in k for k in keys) and any("merger" in k for k in keys)
    assert not mllm.model.visual._forward_hooks  # the probe's hook went with its copy
    after = {k: v for k, v in mllm.state_dict().items() if "lora_" not in k}
    assert all(before[k].equal(after[k]) for k in before)
