"""The miniature model's parts: tokenizer, MLLM config, and the VAE / MLLM pre-training loops (a few steps)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from omnigen2.shapes.mini import QWEN_SPECIAL_TOKENS, VAE_CONFIG, build_tokenizer, image_processor_config, mllm_config
from omnigen2.shapes.pretrain import UnderstandingBatcher, answer, train_mllm, train_vae, vae_reconstruction_error

COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220)}


def scene(rng):
    color = rng.choice(list(COLORS))
    im = Image.new("RGB", (64, 64), (235, 235, 235))
    x, y = rng.choice([11, 32, 53]), rng.choice([11, 32, 53])
    ImageDraw.Draw(im).ellipse([x - 8, y - 8, x + 8, y + 8], fill=COLORS[color])
    return im, color


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["what color is the circle?", "red", "blue", "a red circle at the top left"] * 20, 320)


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = {k: v for k, v in image_processor_config().items() if k not in ("image_processor_type", "processor_class")}
    return Qwen2VLImageProcessorPil(**cfg)


def test_tokenizer_has_qwen_special_tokens_and_template(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(len(QWEN_SPECIAL_TOKENS)))  # special tokens first, single ids
    assert tokenizer.tokenize("<|img|>") == ["<|img|>"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("a red circle").input_ids) == "a red circle"


def test_vae_learns_to_reconstruct():
    def batch(step):
        rng = random.Random(step)
        arr = np.stack([np.asarray(scene(rng)[0], dtype=np.float32) / 127.5 - 1 for _ in range(4)])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": (8, 16, 16), "norm_num_groups": 8})
    before = vae_reconstruction_error(vae, batch, n=2)["mse"]
    train_vae(vae, batch, steps=25, lr=3e-3, warmup=2)
    after = vae_reconstruction_error(vae, batch, n=2)["mse"]
    assert after < 0.5 * before
    with torch.no_grad():  # shift and scale map held-out latents to about zero mean and unit variance
        z = torch.cat([vae.encode(batch(5000 + k)).latent_dist.mode() for k in range(2)])
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(z.mean().item()) < 0.1 and 0.8 < z.std().item() < 1.25


def test_mllm_learns_a_question(tokenizer, image_processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(mllm_config(tokenizer, hidden=64, layers=2, vision_hidden=32))
    batcher = UnderstandingBatcher(tokenizer, image_processor)

    def batch(step):
        rng = random.Random(step)
        return batcher([(im, "what color is the circle?", c) for im, c in (scene(rng) for _ in range(8))])

    inputs = batch(0)
    assert inputs["mm_token_type_ids"].sum() == 8 * 16  # 64x64 -> 8x8 patches -> 16 tokens after the 2x2 merge
    rng = random.Random(0)
    answers = [scene(rng)[1] for _ in range(8)]
    expected = sum(len(tokenizer(a + "<|im_end|>", add_special_tokens=False).input_ids) for a in answers)
    assert (inputs["labels"] != -100).sum().item() == expected  # the loss covers the answers only
    history = train_mllm(model, batch, steps=40, lr=5e-3, warmup=5)
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
    reply = answer(model, batcher, scene(random.Random(5))[0], "what color is the circle?")
    assert reply in COLORS  # a bare colour word: the answer format is learned (reading the colour takes longer)


def test_new_vision_tower_keeps_text_conditioning(tokenizer, image_processor):
    """The grown vision tower trains alone: text-only hidden states (the transformer's conditioning) are the
    same numbers before and after, while what the MLLM sees of an image changes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from omnigen2.shapes.pretrain import new_vision_tower

    torch.manual_seed(0)
    old = Qwen2_5_VLForConditionalGeneration(mllm_config(tokenizer, hidden=64, layers=2, vision_hidden=32)).eval()
    new = new_vision_tower(old, depth=3, vision_hidden=64)
    assert new.config.vision_config.depth == 3 and new.config.vision_config.hidden_size == 64
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.visual.") for n in trainable)
    batcher = UnderstandingBatcher(tokenizer, image_processor)

    def batch(step):
        rng = random.Random(step)
        return batcher([(im, "what color is the circle?", c) for im, c in (scene(rng) for _ in range(4))])

    frozen = {n: p.detach().clone() for n, p in new.named_parameters() if not p.requires_grad}
    train_mllm(new, batch, steps=3, lr=5e-3, warmup=1)
    assert all(torch.equal(p, frozen[n]) for n, p in new.named_parameters() if n in frozen)
    new.eval()

    text = tokenizer(["a red circle at the top left"], return_tensors="pt")
    with torch.no_grad():
        h_old = old(**text, output_hidden_states=True).hidden_states[-1]
        h_new = new(**text, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(h_old, h_new)
        inputs = {k: v for k, v in batch(9).items() if k != "labels"}
        assert not torch.allclose(old(**inputs).logits, new(**inputs).logits)


@pytest.mark.parametrize("hidden", [128, 160, 192])
def test_transformer_config_builds_and_runs(hidden):
    from omnigen2 import OmniGen2Transformer2DModel
    from omnigen2.shapes.mini import transformer_config

    model = OmniGen2Transformer2DModel(**transformer_config(hidden=hidden))
    x = torch.randn(2, 8, 16, 16)  # the miniature VAE's 8 latent channels
    out = model(
        x,
        torch.tensor([0.3, 0.7]),
        torch.randn(2, 5, 128),
        None,
        torch.ones(2, 5, dtype=torch.long),
        [None, [torch.randn(8, 16, 16)]],
    )
    assert out.shape == x.shape


def test_edge_weights():
    from omnigen2.shapes.pretrain import edge_weights

    x = -torch.ones(1, 3, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0  # a 4x4 square
    w = edge_weights(x, 4.0)
    assert w.shape == (1, 1, 16, 16)
    assert w[0, 0, 0, 0] == 1 and w[0, 0, 15, 15] == 1  # flat background
    assert w[0, 0, 5, 7] == 5 and w[0, 0, 6, 6] == 5  # next to and on the square's border
    assert w[0, 0, 2, 2] == 1
