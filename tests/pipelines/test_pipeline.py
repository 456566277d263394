"""Pipeline behaviour beyond the reference cases: batching, guidance branches, callbacks, dtypes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

KW = dict(height=64, width=64, num_inference_steps=3, output_type="pt")


def noise(n=1, seed=0, h=16, w=16):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_text_encoding_equals_full_mllm_call(tiny_pipe):
    """We run the MLLM's decoder stack only; its last hidden states equal the full model's (the original call)."""
    texts = [tiny_pipe.apply_chat_template(p) for p in ("A red circle.", "A much longer prompt about a blue dog.")]
    ids = tiny_pipe.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref = tiny_pipe.mllm(ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True).hidden_states[
            -1
        ]
    ours, mask = tiny_pipe.encode_text(["A red circle.", "A much longer prompt about a blue dog."], 1024, "cpu")
    assert torch.equal(mask, ids.attention_mask)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_chat_template(tiny_pipe):
    text = tiny_pipe.apply_chat_template("Draw a cat.")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant that generates high-quality images")
    assert text.endswith("<|im_start|>user\nDraw a cat.<|im_end|>\n")


def test_batch_equals_single_prompts(tiny_pipe):
    prompts = ["A red circle in the park.", "Two blue squares."]
    lat = noise(2)
    both = tiny_pipe(prompt=prompts, negative_prompt="blurry", latents=lat, **KW).images
    for i, p in enumerate(prompts):
        one = tiny_pipe(prompt=p, negative_prompt="blurry", latents=lat[i : i + 1], **KW).images
        assert (one[0] - both[i]).abs().max() < 1e-5


def test_num_images_per_prompt(tiny_pipe):
    out = tiny_pipe(prompt="A red circle.", num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), **KW)
    assert out.images.shape == (3, 3, 64, 64)
    assert (out.images[0] - out.images[1]).abs().max() > 1e-3  # different noise per image
    same = tiny_pipe(prompt="A red circle.", num_images_per_prompt=2, latents=noise(1).repeat(2, 1, 1, 1), **KW)
    assert torch.allclose(same.images[0], same.images[1], atol=1e-6)


def test_generator_reproducible(tiny_pipe):
    a = tiny_pipe(prompt="A cat.", generator=torch.Generator().manual_seed(7), **KW).images
    b = tiny_pipe(prompt="A cat.", generator=torch.Generator().manual_seed(7), **KW).images
    assert torch.equal(a, b)


def test_guidance_branches(tiny_pipe):
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    out = tiny_pipe(
        prompt="Make it blue.",
        input_images=[img],
        image_guidance_scale=2.0,
        latents=noise(1, h=12),
        **{**KW, "height": None, "width": None},
    )
    assert out.computed_steps == {b: [0, 1, 2] for b in ("cond", "ref", "uncond")}  # three branches, no cache
    assert out.images.shape == (1, 3, 48, 64)  # one input image sets the size (align_res)
    # without images the image guidance is ignored: identical to image_guidance_scale=1
    a = tiny_pipe(prompt="A dog.", image_guidance_scale=3.0, latents=noise(), **KW).images
    b = tiny_pipe(prompt="A dog.", image_guidance_scale=1.0, latents=noise(), **KW).images
    assert torch.equal(a, b)
    # text guidance 1 runs the conditional branch only, and differs from guided sampling
    c = tiny_pipe(prompt="A dog.", text_guidance_scale=1.0, latents=noise(), **KW).images
    assert (a - c).abs().max() > 1e-4


def test_align_res_off_uses_requested_size(tiny_pipe):
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    out = tiny_pipe(
        prompt="Edit.",
        input_images=[img],
        align_res=False,
        height=32,
        width=64,
        **{k: v for k, v in KW.items() if k not in ("height", "width")},
    )
    assert out.images.shape == (1, 3, 32, 64)


def test_reference_latents_mean_or_sampled(tiny_pipe):
    img = Image.new("RGB", (64, 64), (90, 90, 200))
    mean1 = tiny_pipe.encode_images([img], 96 * 96, 96)[0]
    mean2 = tiny_pipe.encode_images([img], 96 * 96, 96)[0]
    assert torch.equal(mean1, mean2)
    s1 = tiny_pipe.encode_images([img], 96 * 96, 96, torch.Generator().manual_seed(1), sample=True)[0]
    s2 = tiny_pipe.encode_images([img], 96 * 96, 96, torch.Generator().manual_seed(1), sample=True)[0]
    assert torch.equal(s1, s2) and not torch.equal(s1, mean1)


def test_callback_can_replace_latents(tiny_pipe):
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, float(t)))
        return {"latents": torch.zeros_like(kw["latents"])} if i == 2 else None

    out = tiny_pipe(prompt="A cat.", latents=noise(), callback_on_step_end=cb, **{**KW, "output_type": "latent"})
    assert [i for i, _ in seen] == [0, 1, 2]
    assert torch.equal(out.images, torch.zeros(1, 4, 16, 16))


def test_custom_timesteps(tiny_pipe):
    a = tiny_pipe(prompt="A cat.", latents=noise(), timesteps=[0.0, 0.3, 0.6], **KW).images
    b = tiny_pipe(prompt="A cat.", latents=noise(), **KW).images
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs(official_tiny, dtype):
    from omnigen2 import OmniGen2Pipeline

    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint", torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == dtype and pipe.mllm.dtype == dtype
    out = pipe(prompt="A red circle.", latents=noise(), **KW).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_warnings_point_at_the_caller(tiny_pipe):
    """A stage's warning names the line that called the pipeline, not a frame inside it or torch's no_grad."""
    kw = {**KW, "width": 70, "max_sequence_length": 8}  # truncated prompt; 70 is not a multiple of 16
    with pytest.warns(UserWarning) as record:
        tiny_pipe(prompt="A red circle in the park.", latents=noise(), **kw)
    messages = {str(w.message).split(" ")[0]: w for w in record}
    assert set(messages) >= {"prompt", "generating"}  # truncation (stage 2) and resize (stage 3)
    for w in messages.values():
        assert w.filename == __file__, (str(w.message), w.filename)
