"""Damaged LoRA files: each case ends in a loaded adapter or a ``CheckpointError`` naming the file, tensor or keys,
within a time limit. The LoRA is a real one, made with peft for the official-tiny transformer, then damaged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from omnigen2 import OmniGen2Pipeline
from omnigen2.errors import CheckpointError
from omnigen2.models import OmniGen2Transformer2DModel
from omnigen2.training.lora import (
    LORA_FILE,
    check_lora_targets,
    config_kwargs,
    lora_state_dict,
    peft_config,
    read_lora,
    save_lora,
)

TIME_LIMIT_S = 5.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def transformer(official_tiny) -> OmniGen2Transformer2DModel:
    """The fixture's transformer without adapters: the modules a LoRA must match."""
    return OmniGen2Transformer2DModel.from_pretrained(official_tiny / "checkpoint" / "transformer")


@pytest.fixture(scope="module")
def lora_file(official_tiny, tmp_path_factory) -> Path:
    """A rank-4 LoRA of the fixture transformer's attention, saved as the training code saves it."""
    model = OmniGen2Transformer2DModel.from_pretrained(official_tiny / "checkpoint" / "transformer")
    config = peft_config(4, 8.0, 0.0, TARGETS)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); give it weights
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return save_lora(tmp_path_factory.mktemp("lora"), lora_state_dict(model), config_kwargs(config))


def raw(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def read_within_limit(path, transformer):
    start = time.monotonic()
    try:
        return read_lora(path, transformer)
    finally:
        assert time.monotonic() - start < TIME_LIMIT_S


def test_the_lora_loads(lora_file, transformer, official_tiny):
    sd, config = read_lora(lora_file, transformer)
    adapted = [n for n, _ in transformer.named_modules() if n.endswith(tuple(f".{t}" for t in TARGETS))]
    assert config["r"] == 4 and len(sd) == 2 * len(adapted)  # one lora_A and one lora_B per adapted module
    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint")
    pipe.load_lora_weights(lora_file)
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


# -- damaged files --------------------------------------------------------------------------------------------


@settings(max_examples=20)
@given(data=st.data())
def test_truncated_lora_is_refused_naming_it(lora_file, transformer, tmp_path_factory, data):
    content = lora_file.read_bytes()
    cut = data.draw(st.integers(0, len(content) - 1), label="length")
    path = tmp_path_factory.mktemp("cut") / LORA_FILE
    path.write_bytes(content[:cut])
    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file"):
        read_within_limit(path, transformer)


@settings(max_examples=30)
@given(data=st.data())
def test_byte_flip_loads_or_is_refused_naming_the_file(lora_file, transformer, tmp_path_factory, data):
    content = bytearray(lora_file.read_bytes())
    header = 8 + int.from_bytes(content[:8], "little")
    end = header if data.draw(st.booleans(), label="in header") else len(content)
    pos = data.draw(st.integers(0, end - 1), label="position")
    content[pos] ^= data.draw(st.integers(1, 255), label="xor")
    path = tmp_path_factory.mktemp("flip") / LORA_FILE
    path.write_bytes(bytes(content))
    try:
        sd, _ = read_within_limit(path, transformer)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        assert all(torch.isfinite(v).all() for v in sd.values())


@settings(max_examples=25)
@given(data=st.data())
def test_dropped_keys_leave_whole_pairs_or_are_refused_naming_them(lora_file, transformer, tmp_path_factory, data):
    tensors, metadata = raw(lora_file)
    keys = sorted(tensors)
    dropped = data.draw(st.sets(st.sampled_from(keys), min_size=1, max_size=6), label="dropped")
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    path = tmp_path_factory.mktemp("drop") / LORA_FILE
    save_file(kept, str(path), metadata=metadata)
    modules = {k.rsplit(".lora_", 1)[0] for k in kept}
    lone = sorted(
        f"{m}.lora_{side}"[len("transformer.") :]
        for m in modules
        for side, other in (("A", "B"), ("B", "A"))
        if f"{m}.lora_{side}.weight" in kept and f"{m}.lora_{other}.weight" not in kept
    )
    if not kept:
        with pytest.raises(CheckpointError, match="no LoRA weights found"):
            read_within_limit(path, transformer)
    elif lone:
        with pytest.raises(CheckpointError, match="without its") as e:
            read_within_limit(path, transformer)
        assert any(name in str(e.value) for name in lone)
    else:
        sd, _ = read_within_limit(path, transformer)
        assert len(sd) == len(kept)


@settings(max_examples=15)
@given(data=st.data())
def test_non_finite_value_is_refused_naming_the_tensor(lora_file, transformer, tmp_path_factory, data):
    tensors, metadata = raw(lora_file)
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    flat = tensors[key].view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1), label="index")] = data.draw(
        st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value"
    )
    path = tmp_path_factory.mktemp("nan") / LORA_FILE
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="holds non-finite values") as e:
        read_within_limit(path, transformer)
    assert key[len("transformer.") :] in str(e.value)


def _rewrite(lora_file: Path, tmp_path: Path, change) -> Path:
    tensors, metadata = raw(lora_file)
    tensors, metadata = change(tensors, metadata)
    path = tmp_path / LORA_FILE
    save_file(tensors, str(path), metadata=metadata)
    return path


def _rank_cut(tensors, metadata):
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    return {**tensors, key: tensors[key][:3]}, metadata


def _renamed(tensors, metadata):
    return {k.replace(".to_q.", ".to_query."): v for k, v in tensors.items()}, metadata


def _wrong_in_features(tensors, metadata):
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    return {**tensors, key: torch.zeros(4, 7)}, metadata


def _metadata_rank(tensors, metadata):
    meta = json.loads(metadata["lora_adapter_metadata"])
    meta["transformer.r"] = 8
    return tensors, {**metadata, "lora_adapter_metadata": json.dumps(meta)}


def _metadata_junk(tensors, metadata):
    return tensors, {**metadata, "lora_adapter_metadata": "{r: 4"}


def _int_weights(tensors, metadata):
    key = sorted(tensors)[0]
    return {**tensors, key: tensors[key].to(torch.int32)}, metadata


@pytest.mark.parametrize(
    "change, message",
    [
        (_rank_cut, r"lora_A of shape \[3, 64\] and lora_B of shape \[\d+, 4\]; their ranks"),
        (_renamed, r"adapted modules are not in the transformer: .*to_query"),
        (_wrong_in_features, r"maps 64 -> \d+ features, but its lora_A has shape \[4, 7\]"),
        (_metadata_rank, r"metadata says rank 8 but .* \(rank 4\)"),
        (_metadata_junk, r"metadata 'lora_adapter_metadata' is not valid JSON"),
        (_int_weights, r"has dtype torch.int32, not a float"),
    ],
)
def test_inconsistent_lora_is_refused(lora_file, transformer, tmp_path, change, message):
    path = _rewrite(lora_file, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        read_within_limit(path, transformer)


def test_unmatched_keys_need_the_transformer(lora_file, transformer, tmp_path):
    """Without the transformer read_lora cannot know the modules; check_lora_targets is the check to call."""
    sd, _ = read_lora(_rewrite(lora_file, tmp_path, _renamed))
    with pytest.raises(
        CheckpointError, match=r"5 of 20 adapted modules are not in the transformer: context_refiner.0.attn.to_query"
    ):
        check_lora_targets(transformer, sd)


@pytest.mark.parametrize("name, content", [("lora.bin", b"\x80\x04junk"), ("lora.safetensors", b"PK\x03\x04 zip")])
def test_not_safetensors_is_refused_naming_it(transformer, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_lora(path, transformer)


def test_state_dict_with_non_tensor_value(transformer):
    with pytest.raises(TypeError, match="'layers.0.attn.to_q.lora_A.weight' is a list, not a tensor"):
        read_lora({"layers.0.attn.to_q.lora_A.weight": [1.0], "layers.0.attn.to_q.lora_B.weight": [1.0]})


def test_half_pairs_refused_by_the_pipeline(lora_file, tmp_path, official_tiny):
    tensors, metadata = raw(lora_file)
    half = {k: v for k, v in tensors.items() if ".lora_B." not in k}
    save_file(half, str(tmp_path / LORA_FILE), metadata=metadata)
    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint")
    with pytest.raises(
        CheckpointError, match=r"lora_A without its lora_B: context_refiner.0.attn.to_k.lora_A, .* \(and 15 more\)"
    ):
        pipe.load_lora_weights(tmp_path)
