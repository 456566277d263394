"""Performance work keeps the numbers: packed guidance, exact savings, quantization, offload and the bench."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from omnigen2 import OmniGen2Pipeline, OmniGen2Transformer2DModel
from omnigen2.acceleration.memory import Int8WeightOnlyLinear, enable_offload, quantize_transformer
from omnigen2.bench import BenchConfig, record_markdown, run_bench, transformer_flops
from omnigen2.cli import main
from tests.pipelines.test_parity import CASES, run_case


def _random_tiny(seed=0) -> OmniGen2Transformer2DModel:
    torch.manual_seed(seed)
    model = OmniGen2Transformer2DModel.from_preset("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():  # the training init zeroes the modulation and output layers
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_packed_branches_equal_separate_calls():
    """Three guidance branches (different text lengths, shared target and references) in one packed call
    give each branch's separate output."""
    model = _random_tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 12, generator=g)
    refs = [[torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 4, generator=g)]]
    cond, neg = torch.randn(1, 9, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([0.37])
    branches = [(cond, refs), (neg, refs), (neg, [None])]
    with torch.no_grad():
        alone = [model(x, t, txt, None, torch.ones(1, txt.shape[1]), r) for txt, r in branches]
        text = torch.zeros(3, 9, 32)
        mask = torch.zeros(3, 9, dtype=torch.bool)
        for i, (txt, _) in enumerate(branches):
            text[i, : txt.shape[1]], mask[i, : txt.shape[1]] = txt[0], True
        all_refs = [r[0] for _, r in branches]
        layout = model.build_layout(
            mask,
            [[tuple(r.shape[-2:]) for r in (s or [])] for s in all_refs],
            [(8, 12)] * 3,
            img_groups=[0, 0, 0],
            ref_groups=[0, 0, None],
        )
        assert len(layout.img_rows) == 1 and layout.num_refs == 2  # the shared target / references refined once
        packed = model([x[0]] * 3, t, text, None, mask, all_refs, layout=layout)
    for a, b in zip(alone, packed):
        assert (a[0] - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["edit_one", "t2i_teacache", "edit_taylorseer", "t2i_cfgrange"])
def test_batched_guidance_equals_sequential_on_fixtures(tiny_pipe, official_tiny, name):
    case = next(c for c in CASES if c["name"] == name)
    outs = {}
    for batched in (True, False):
        tiny_pipe.batch_guidance = batched
        try:
            out, expected = run_case(tiny_pipe, case, official_tiny / "cases")
        finally:
            tiny_pipe.batch_guidance = True
        outs[batched] = out
        assert (out.images[0] - expected).abs().max().item() <= 2e-4
    assert outs[True].computed_steps == outs[False].computed_steps  # per-branch cache decisions kept
    assert (outs[True].images[0] - outs[False].images[0]).abs().max().item() < 1e-5


def test_int8_linear_error_is_bounded():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int8WeightOnlyLinear(lin)
    x = torch.randn(7, 5, 64)
    ref, out = lin(x), q(x)
    assert out.shape == ref.shape and q.weight_int8.dtype == torch.int8
    assert (out - ref).abs().max() / ref.abs().max() < 1e-2


def test_int8_pipeline_error_on_fixture(tiny_pipe, official_tiny):
    """Measured on the fixtures: ~3e-3 max / ~5e-4 mean absolute error (tiny random weights, see docs/BENCHMARKS.md,
    "Parity with the original")."""
    case = next(c for c in CASES if c["name"] == "edit_one")
    pipe = copy.copy(tiny_pipe)
    pipe.transformer = quantize_transformer(copy.deepcopy(tiny_pipe.transformer), "int8", backend="torch")
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in pipe.transformer.layers.modules())
    assert isinstance(pipe.transformer.x_embedder, torch.nn.Linear)  # embeddings stay in full precision
    out, expected = run_case(pipe, case, official_tiny / "cases")
    err = (out.images[0] - expected).abs()
    assert err.max().item() < 2e-2 and err.mean().item() < 2e-3


def test_fp8_needs_hopper():
    with pytest.raises((RuntimeError, ImportError)):
        quantize_transformer(_random_tiny(), "fp8")


@pytest.mark.parametrize("mode", ["group", "model"])
def test_offload_modes_keep_parity_on_cpu(official_tiny, mode):
    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    enable_offload(pipe, mode, "cpu")
    case = next(c for c in CASES if c["name"] == "edit_one")
    out, expected = run_case(pipe, case, official_tiny / "cases")
    assert (out.images[0] - expected).abs().max().item() <= 2e-4


def test_flop_count_matches_hand_count():
    model = OmniGen2Transformer2DModel.from_preset("tiny")
    mask = torch.ones(1, 3, dtype=torch.bool)
    layout = model.build_layout(mask, [[]], [(4, 4)])  # 3 text + 4 image tokens, no references
    c, inner, ct, hd = 64, 256, 64, 16  # hidden, MLP inner size (4*64 rounded to 16), temb, head dim
    per_tok = 2 * (c * c + 2 * c * (2 * hd) + c * c + 3 * c * inner)  # q, k+v (2 kv heads), out, MLP
    kv = 2 * 2 * c * (2 * hd)
    attn = lambda nq, nk: 4 * nq * nk * c  # QK^T + PV over all heads
    mod = 2 * ct * 4 * c
    joint = (per_tok * 7 + attn(7, 7) + mod) + (kv * 7 + (per_tok - kv) * 4 + attn(4, 7) + mod)
    noise = per_tok * 4 + attn(4, 4) + mod
    embed = 2 * (256 * ct + ct * ct) + 2 * 16 * c * 4 + 2 * (ct * c + c * 16) * 4
    assert transformer_flops(model, layout, context=False) == pytest.approx(joint + noise + embed)


def test_bench_runs_on_tiny_and_records(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Training throughput\n\n| a |\n| --- |\n")
    rc = main(["bench", "--preset", "tiny", "--height", "32", "--width", "32", "--steps", "2", "--repeats", "1",
               "--warmup", "0", "--write", str(md)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "per step" in printed
    text = md.read_text()
    assert "## Inference" in text and "## Training throughput" in text and "`omnigen2 bench --preset tiny" in text
    result = run_bench(BenchConfig(preset="tiny", height=32, width=32, steps=2, repeats=1, warmup=0, branches=2))
    assert len(result.step_s) == 2 and result.flops > 0
    record_markdown(result, md, "second")
    dated = [line for line in md.read_text().splitlines() if re.match(r"\| \d{4}-\d{2}-\d{2} ", line)]
    assert len(dated) == 2  # two dated rows in the Inference table


def test_bench_of_a_model_is_text_only_unless_asked(official_tiny, monkeypatch, capsys):
    """`bench --model M` times the prompt alone; input images only with --num-images."""
    seen = []
    call = OmniGen2Pipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("input_images"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(OmniGen2Pipeline, "__call__", spy)
    args = ["bench", "--model", str(official_tiny / "checkpoint"), "--height", "64", "--width", "64", "--steps", "1",
            "--repeats", "1", "--warmup", "0"]  # fmt: skip
    assert main(args) == 0
    assert seen == [None] and "0 input image(s)" in capsys.readouterr().out
    assert main([*args, "--num-images", "2"]) == 0
    assert len(seen) == 2 and len(seen[1]) == 2 and "2 input image(s)" in capsys.readouterr().out
