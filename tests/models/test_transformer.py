"""The OmniGen2 transformer: reference outputs, released key layout, Omni-RoPE, masking and backends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from omnigen2 import OmniGen2Transformer2DModel
from omnigen2.models.attention import attention, flash_attn_available


@pytest.fixture(scope="module")
def tiny(official_tiny):
    model = OmniGen2Transformer2DModel.from_pretrained(official_tiny / "checkpoint" / "transformer")
    return model.eval()


@pytest.fixture(scope="module")
def batch(official_tiny):
    return load_file(official_tiny / "cases" / "transformer_batch.safetensors")


def run_batch(model, d, freqs_cis=None):
    with torch.no_grad():
        return model(
            [d["x0"], d["x1"], d["x2"]],
            d["t"],
            d["text"],
            freqs_cis,
            d["text_mask"],
            [None, [d["ref1_0"]], [d["ref2_0"], d["ref2_1"]]],
        )


BACKENDS = ["auto", "sdpa", "math"] + (["flash_varlen"] if flash_attn_available() and torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_batch_matches_original(tiny, batch, backend):
    tiny.set_attention_backend(backend)
    try:
        out = run_batch(tiny, batch, freqs_cis=tiny.get_freqs_cis())
    finally:
        tiny.set_attention_backend("auto")
    for i in range(3):
        assert out[i].shape == batch[f"out{i}"].shape
        err = (out[i] - batch[f"out{i}"]).abs().max().item()
        assert err <= 1e-4, f"sample {i} ({backend}): {err:.2e}"


def test_padding_does_not_leak_between_samples(tiny, batch):
    """Each sample of the padded batch equals that sample run alone."""
    full = run_batch(tiny, batch)
    refs = [None, [batch["ref1_0"]], [batch["ref2_0"], batch["ref2_1"]]]
    lens = batch["text_mask"].sum(1).tolist()
    for i in range(3):
        with torch.no_grad():
            alone = tiny(
                [batch[f"x{i}"]],
                batch["t"][i : i + 1],
                batch["text"][i : i + 1, : lens[i]],
                None,
                batch["text_mask"][i : i + 1, : lens[i]],
                [refs[i]],
            )[0]
        assert (alone - full[i]).abs().max().item() < 1e-5


def test_tensor_and_list_latents_agree(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        as_tensor = tiny(x, t, text, None, mask)
        as_list = tiny(list(x), t, text, None, mask)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == x.shape
    assert torch.equal(as_tensor, torch.stack(as_list))


def test_released_full_size_layout():
    """The released transformer: 582 state-dict keys, ~4B parameters, hidden 2520, 32 joint blocks."""
    with torch.device("meta"):
        model = OmniGen2Transformer2DModel.from_preset("full")
    sd = model.state_dict()
    assert len(sd) == 582
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(3.97, abs=0.05)
    assert sd["layers.31.norm1.linear.weight"].shape == (4 * 2520, 1024)  # modulation from the 1024-d temb
    assert sd["layers.0.attn.to_k.weight"].shape == (7 * 120, 2520)  # 7 kv heads of 120
    assert sd["layers.0.feed_forward.linear_1.weight"].shape == (10240, 2520)  # 4*2520 rounded up to 256
    assert sd["image_index_embedding"].shape == (5, 2520)
    assert "context_refiner.1.norm1.weight" in sd and "context_refiner.1.norm1.linear.weight" not in sd
    assert sd["norm_out.linear_2.weight"].shape == (2 * 2 * 16, 2520)


def test_omni_rope_positions(tiny):
    """Text token i at (i, i, i); each image restarts its grid at (0, 0) after a shift of its larger side."""
    mask = torch.tensor([[1, 1, 1, 0]])
    layout = tiny.build_layout(mask, [[(8, 4), (4, 4)]], [(6, 8)])  # latent pixels; patch 2
    pos = layout.pos_ids[0]
    assert pos[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    ref0 = pos[3 : 3 + 8]  # 4x2 tokens
    assert ref0[:, 0].unique().tolist() == [3]
    assert ref0[:, 1:].tolist() == [[r, c] for r in range(4) for c in range(2)]
    ref1 = pos[11 : 11 + 4]  # 2x2 tokens, shift 3 + max(4, 2)
    assert ref1[:, 0].unique().tolist() == [7]
    assert ref1[:, 1:].tolist() == [[r, c] for r in range(2) for c in range(2)]
    img = pos[15 : 15 + 12]  # 3x4 tokens, shift 7 + max(2, 2)
    assert img[:, 0].unique().tolist() == [9]
    assert img[:, 1:].tolist() == [[r, c] for r in range(3) for c in range(4)]
    assert layout.seq_lens == [3 + 8 + 4 + 12]


def test_too_many_reference_images(tiny):
    mask = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at most|supports 5"):
        tiny.build_layout(mask, [[(4, 4)] * 6], [(4, 4)])


def test_unknown_attention_backend(tiny):
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny.set_attention_backend("xformers")
    if not flash_attn_available():
        with pytest.raises(ImportError, match="flash-attn"):
            tiny.set_attention_backend("flash_varlen")


def test_attention_backends_agree_with_padding():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 7, 4, 8, generator=g) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # 2 kv heads for 4 query heads
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ref = attention(q, k, v, mask, "math")
    out = attention(q, k, v, mask, "sdpa")
    assert (out - ref).abs().max() < 1e-5
    # padded keys carry no weight: changing them leaves the real rows unchanged
    k2, v2 = k.clone(), v.clone()
    k2[1, 4:], v2[1, 4:] = 100.0, -100.0
    out2 = attention(q, k2, v2, mask, "sdpa")
    assert (out2[1, :4] - out[1, :4]).abs().max() < 1e-5


def test_gradient_checkpointing_same_gradients(official_tiny):
    model = OmniGen2Transformer2DModel.from_pretrained(official_tiny / "checkpoint" / "transformer")
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    mask, t = torch.ones(1, 5, dtype=torch.long), torch.tensor([0.3])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            model.enable_gradient_checkpointing()
        model(
            x, t, text, None, mask, [[torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(3))]]
        ).square().mean().backward()
        grads.append(model.layers[0].attn.to_q.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_positions_beyond_rope_tables_are_refused(tiny):
    """The tiny config's tables hold 1024 positions on the row/column axes, which text tokens also use."""
    mask = torch.ones(1, 1030, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds axes_lens"):
        tiny.build_layout(mask, [[]], [(8, 8)])


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        OmniGen2Transformer2DModel.from_preset("tiny", num_attention_heads=5, num_kv_heads=2, hidden_size=80)
    with pytest.raises(ValueError, match="sum\\(axes_dim_rope\\)"):
        OmniGen2Transformer2DModel.from_preset("tiny", axes_dim_rope=(4, 4, 4))


def test_position_table_accepts_exactly_the_samples_whose_positions_fit():
    """PositionTable (what the pipeline and training indexing check) agrees with the positions the layout
    gives: a sample fits exactly when every Omni-RoPE position is below axes_lens on its axis."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from omnigen2.models.transformer_omnigen2 import PositionTable, _sample_positions

    table = PositionTable((40, 12, 10), 4)
    side = st.integers(1, 16).map(lambda n: 4 * n)  # pixel sides, whole tokens of 4 pixels

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(text=st.integers(1, 20), refs=st.lists(st.tuples(side, side), max_size=3), target=st.tuples(side, side))
    def check(text, refs, target):
        pos = _sample_positions(text, [*refs, target], table.token_px, "cpu")
        fits = all(int(pos[:, axis].max()) < n for axis, n in enumerate(table.axes_lens))
        claimed = all(table.image_fits(s) for s in (*refs, target)) and text <= table.text_room(refs)
        assert claimed == fits, (text, refs, target)

    check()
