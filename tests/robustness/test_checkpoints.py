"""Damaged checkpoints: each case ends in a successful load or a ``CheckpointError`` naming the file, field or
tensor, within a time limit, and loading writes nothing into the checkpoint.

Most examples run the pre-validation (``omnigen2.loading.inspect_layout`` + ``prevalidate``) directly; a few go
end to end through ``OmniGen2Pipeline.from_pretrained``, where whatever the pre-validation lets through must load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from omnigen2 import OmniGen2Pipeline, checkpoint_check
from omnigen2.errors import CheckpointError
from omnigen2.loading import inspect_layout, load_reflection_adapter, prevalidate

TIME_LIMIT_S = 10.0  # one case; the fixture checks in about 0.1 s
MODEL_FOLDERS = ("transformer", "vae", "mllm")


@pytest.fixture(scope="module")
def fixture_ckpt(official_tiny) -> Path:
    return official_tiny / "checkpoint"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@contextmanager
def damaged_copy(src: Path):
    """A writable copy of the checkpoint to damage; afterwards, the check that loading wrote nothing into it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(src, Path(tmp) / "ckpt", copy_function=shutil.copyfile))
        for d, dirs, _ in os.walk(root):
            for name in dirs:
                os.chmod(Path(d) / name, 0o755)
        yield root


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check(root: Path, end_to_end: bool = False) -> CheckpointError | None:
    """Pre-validate ``root`` (and load it, with ``end_to_end``); the CheckpointError, or None when it loads."""
    before, start = listing(root), time.monotonic()
    try:
        if end_to_end:
            OmniGen2Pipeline.from_pretrained(root)
        else:
            prevalidate(root, inspect_layout(root), {}, torch.float32, None)
        error = None
    except CheckpointError as e:
        error = e
    assert time.monotonic() - start < TIME_LIMIT_S
    assert listing(root) == before, "loading wrote into the checkpoint"
    return error


def shards(root: Path) -> list[Path]:
    return sorted(p for comp in MODEL_FOLDERS for p in (root / comp).glob("*.safetensors"))


def header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def stored(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def index_file(folder: Path) -> Path | None:
    found = list(folder.glob("*.safetensors.index.json"))
    return found[0] if found else None


def all_tensors(root: Path) -> list[tuple[str, str, str]]:
    """(component, shard name, tensor) of every stored tensor."""
    return [(path.parent.name, path.name, name) for path in shards(root) for name in checkpoint_check.read_header(path)]


def test_the_released_layouts_pass(fixture_ckpt):
    with damaged_copy(fixture_ckpt) as root:
        assert check(root) is None
    builtin = checkpoint_check.__file__.replace("checkpoint_check.py", "builtin/shapes")
    prevalidate(Path(builtin), inspect_layout(Path(builtin)), {}, torch.float32, None)


# -- shard files: truncations and byte flips ------------------------------------------------------------------


@settings(max_examples=25)
@given(data=st.data())
def test_truncated_shard_is_refused_naming_it(fixture_ckpt, data):
    with damaged_copy(fixture_ckpt) as root:
        shard = data.draw(st.sampled_from(shards(root)), label="shard")
        raw = shard.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1), label="length")
        shard.write_bytes(raw[:cut])
        error = check(root)
        assert error is not None and shard.name in str(error)


def flip_a_byte(root: Path, data, in_header: bool) -> Path:
    """XOR one byte of a drawn shard (within its header: length + JSON, when ``in_header``); the shard."""
    shard = data.draw(st.sampled_from(shards(root)), label="shard")
    raw = bytearray(shard.read_bytes())
    end = header_end(shard) if in_header else len(raw)
    pos = data.draw(st.integers(0, end - 1), label="position")
    raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    shard.write_bytes(bytes(raw))
    return shard


@settings(max_examples=30)
@given(data=st.data())
def test_byte_flip_loads_or_is_refused_naming_the_file(fixture_ckpt, data):
    with damaged_copy(fixture_ckpt) as root:
        # half of the flips in the header, where they change what the file claims to hold
        shard = flip_a_byte(root, data, in_header=data.draw(st.booleans(), label="in header"))
        error = check(root)
        if error is not None:
            assert shard.name in str(error) or str(shard.parent) in str(error), str(error)


@settings(max_examples=6)
@given(data=st.data())
def test_byte_flip_end_to_end(fixture_ckpt, data):
    """What the pre-validation accepts, from_pretrained loads; a flip in tensor data only changes numbers."""
    with damaged_copy(fixture_ckpt) as root:
        shard = flip_a_byte(root, data, in_header=False)
        error = check(root, end_to_end=True)
        if error is not None:
            assert shard.name in str(error) or str(shard.parent) in str(error), str(error)


# -- tensors dropped or reshaped ------------------------------------------------------------------------------


def rewrite(root: Path, comp: str, shard_name: str, tensor: str, action: str) -> None:
    """Drop ``tensor`` from its shard (and from the index, unless ``action`` is "drop from shard") or reshape it."""
    path = root / comp / shard_name
    tensors, metadata = stored(path)
    value = tensors.pop(tensor)
    if action == "reshape":
        tensors[tensor] = torch.zeros(*value.shape[:-1], value.shape[-1] + 1) if value.ndim else torch.zeros(2)
    elif action == "flatten":
        tensors[tensor] = value.reshape(-1, 1) if value.ndim != 2 or value.shape[1] != 1 else value.reshape(-1)
    save_file(tensors, str(path), metadata=metadata)
    index = index_file(root / comp)
    if action == "drop" and index is not None:
        content = json.loads(index.read_text())
        del content["weight_map"][tensor]
        index.write_text(json.dumps(content))


@settings(max_examples=30)
@given(data=st.data())
def test_dropped_or_reshaped_tensor_is_refused_naming_it(fixture_ckpt, data):
    with damaged_copy(fixture_ckpt) as root:
        comp, shard_name, tensor = data.draw(st.sampled_from(all_tensors(root)), label="tensor")
        actions = ["drop", "reshape", "flatten"] + (["drop from shard"] if index_file(root / comp) else [])
        rewrite(root, comp, shard_name, tensor, data.draw(st.sampled_from(actions), label="action"))
        error = check(root)
        assert error is not None and tensor in str(error), (tensor, error)


@pytest.mark.parametrize(
    "comp, tensor",
    [
        ("mllm", "model.layers.1.mlp.up_proj.weight"),  # the case: loaded as random initialisation
        ("transformer", "layers.0.attn.to_q.weight"),  # was "Cannot copy out of meta tensor"
        ("vae", "decoder.conv_in.bias"),
    ],
)
def test_missing_tensor_end_to_end(fixture_ckpt, comp, tensor):
    with damaged_copy(fixture_ckpt) as root:
        shard = next(p for p in (root / comp).glob("*.safetensors") if tensor in checkpoint_check.read_header(p))
        rewrite(root, comp, shard.name, tensor, "drop")
        with pytest.raises(CheckpointError, match=f"{comp}: 1 tensor.*{tensor}.*random initialisation"):
            OmniGen2Pipeline.from_pretrained(root)


def test_extra_tensor_warns_and_loads(fixture_ckpt):
    with damaged_copy(fixture_ckpt) as root:
        path = root / "vae" / "diffusion_pytorch_model.safetensors"
        tensors, metadata = stored(path)
        save_file({**tensors, "decoder.unused.weight": torch.zeros(3)}, str(path), metadata=metadata)
        with pytest.warns(UserWarning, match=r"vae: 1 tensor\(s\) in .* not used by the model.*decoder.unused"):
            assert check(root) is None


# -- shard indexes ------------------------------------------------------------------------------------------


def _index_damage(content: dict, shard: str, tensor: str):
    return {
        "not json": "{weight_map",
        "not an object": "[1, 2]",
        "weight_map a list": json.dumps({**content, "weight_map": list(content["weight_map"])}),
        "empty weight_map": json.dumps({**content, "weight_map": {}}),
        "parent path": json.dumps({**content, "weight_map": {**content["weight_map"], tensor: f"../{shard}"}}),
        "absolute path": json.dumps({**content, "weight_map": {**content["weight_map"], tensor: f"/tmp/{shard}"}}),
        "not a string": json.dumps({**content, "weight_map": {**content["weight_map"], tensor: 3}}),
        "missing shard": json.dumps({**content, "weight_map": {**content["weight_map"], tensor: "x.safetensors"}}),
    }


@pytest.mark.parametrize("comp", ["transformer", "mllm"])
@pytest.mark.parametrize("damage", list(_index_damage({"weight_map": {}}, "", "")))
def test_bad_index_is_refused_naming_it(fixture_ckpt, comp, damage):
    with damaged_copy(fixture_ckpt) as root:
        index = index_file(root / comp)
        content = json.loads(index.read_text())
        tensor, shard = next(iter(content["weight_map"].items()))
        index.write_text(_index_damage(content, shard, tensor)[damage])
        error = check(root)
        assert error is not None and index.name in str(error), error


@pytest.mark.parametrize("comp", ["transformer", "mllm"])
def test_index_naming_the_wrong_shard(fixture_ckpt, comp):
    with damaged_copy(fixture_ckpt) as root:
        index = index_file(root / comp)
        content = json.loads(index.read_text())
        names = sorted(set(content["weight_map"].values()))
        tensor = next(t for t, s in content["weight_map"].items() if s == names[0])
        content["weight_map"][tensor] = names[1]
        index.write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=f"places tensor '{tensor}' in .*{names[1]}, which does not hold"):
            OmniGen2Pipeline.from_pretrained(root)


# -- config fields ------------------------------------------------------------------------------------------


def config_fields(comp: str) -> list[tuple[str | None, str]]:
    """(sub-object or None, field) of each checked field of ``comp``'s config.json."""
    if comp == "transformer":
        return [(None, f) for f in checkpoint_check.TRANSFORMER_FIELDS]
    if comp == "vae":
        return [(None, f) for f in checkpoint_check.VAE_FIELDS]
    return (
        [(None, f) for f in checkpoint_check.MLLM_TOP_FIELDS]
        + [("text_config", f) for f in checkpoint_check.MLLM_TEXT_FIELDS]
        + [("vision_config", f) for f in checkpoint_check.MLLM_VISION_FIELDS]
    )


FIELDS = [(comp, sub, f) for comp in MODEL_FOLDERS for sub, f in config_fields(comp)]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-2, 130),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(-2, 70), max_size=4),
    st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), value=VALUES)
@example(field=("transformer", None, "num_layers"), value=3)  # a consistent config the weights do not match
def test_config_field_loads_or_is_refused_naming_it(fixture_ckpt, field, value):
    comp, sub, name = field
    with damaged_copy(fixture_ckpt) as root:
        file = root / comp / "config.json"
        config = json.loads(file.read_text())
        (config[sub] if sub else config)[name] = value
        file.write_text(json.dumps(config))
        error = check(root)
        if error is not None:
            assert "config.json" in str(error), error
            if str(error).startswith(f"{file}: field"):
                assert f"{sub + '.' if sub else ''}{name}" in str(error)


@pytest.mark.parametrize(
    "comp, sub, name, value",
    [
        ("transformer", None, "num_layers", 10**6),
        ("transformer", None, "hidden_size", 10**6),
        ("transformer", None, "axes_lens", [2048, 10**9, 1024]),
        ("vae", None, "block_out_channels", [10**6, 16, 16]),
        ("mllm", "text_config", "num_hidden_layers", 10**6),
        ("mllm", "text_config", "vocab_size", 10**9),
        ("mllm", "vision_config", "depth", 10**5),
    ],
)
def test_absurd_config_is_refused_before_building(fixture_ckpt, comp, sub, name, value):
    with damaged_copy(fixture_ckpt) as root:
        file = root / comp / "config.json"
        config = json.loads(file.read_text())
        (config[sub] if sub else config)[name] = value
        file.write_text(json.dumps(config))
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=f"field '{(sub + '.') if sub else ''}{name}' is"):
            OmniGen2Pipeline.from_pretrained(root)
        assert time.monotonic() - start < 2.0


def test_parameter_count_bound(fixture_ckpt, monkeypatch):
    """A config within every field bound can still describe too large a model: refused by its parameter count."""
    monkeypatch.setattr(checkpoint_check, "MAX_PARAMETERS", 10_000)
    with damaged_copy(fixture_ckpt) as root:
        with pytest.raises(CheckpointError, match=r"describes a transformer of [\d,]+ parameters.*num_layers=2"):
            prevalidate(root, inspect_layout(root), {}, torch.float32, None)


# -- memory ---------------------------------------------------------------------------------------------------


def test_memory_refusal_and_its_switch(fixture_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint_check, "available_memory", lambda device: (1000, "test figure"))
    pipe = OmniGen2Pipeline.from_pretrained(fixture_ckpt, check_memory=False)
    expected = 4 * sum(p.numel() for c in MODEL_FOLDERS for p in getattr(pipe, c).parameters())  # float32
    with pytest.raises(CheckpointError, match=r"needs about .* GiB at float32 \(transformer .*check_memory=False"):
        OmniGen2Pipeline.from_pretrained(fixture_ckpt)
    monkeypatch.setattr(checkpoint_check, "available_memory", lambda device: (expected, "test figure"))
    OmniGen2Pipeline.from_pretrained(fixture_ckpt)  # exactly enough
    monkeypatch.setattr(checkpoint_check, "available_memory", lambda device: (expected - 1, "test figure"))
    with pytest.raises(CheckpointError, match="test figure"):
        OmniGen2Pipeline.from_pretrained(fixture_ckpt)
    OmniGen2Pipeline.from_pretrained(fixture_ckpt, check_memory=False)


def test_available_memory_reads_the_machine():
    free, source = checkpoint_check.available_memory(None)
    assert free > 0 and source


# -- errors that escape the libraries -------------------------------------------------------------------------


def test_library_error_is_wrapped_naming_the_folder(fixture_ckpt, monkeypatch):
    from diffusers import AutoencoderKL

    def broken(*args, **kwargs):
        raise OSError("Unable to load weights from checkpoint file")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", broken)
    with pytest.raises(CheckpointError, match=r"vae: loading the vae failed \(OSError: Unable to load weights") as e:
        OmniGen2Pipeline.from_pretrained(fixture_ckpt)
    assert isinstance(e.value.__cause__, OSError)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


# -- the processor --------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json")


@settings(max_examples=20)
@given(
    name=st.sampled_from(TOKENIZER_FILES),
    content=st.one_of(
        st.binary(max_size=64),
        st.text(max_size=40).map(str.encode),
        st.builds(
            json.dumps,
            st.one_of(st.dictionaries(st.text(max_size=8), st.integers(), max_size=3), st.lists(st.integers())),
        ).map(str.encode),
    ),
)
def test_junk_tokenizer_file_is_refused_naming_it(fixture_ckpt, name, content):
    with damaged_copy(fixture_ckpt) as root:
        (root / "processor" / name).write_bytes(content)
        error = check(root)
        if name == "tokenizer.json" or error is not None:  # a tokenizer.json that is not one never passes
            assert error is not None and name in str(error), error


@pytest.mark.parametrize("content", [b"", b"\xff\xfe junk", b'{"model": 3}'])
def test_junk_tokenizer_end_to_end(fixture_ckpt, content):
    with damaged_copy(fixture_ckpt) as root:
        (root / "processor" / "tokenizer.json").write_bytes(content)
        with pytest.raises(CheckpointError, match="processor/tokenizer.json"):
            OmniGen2Pipeline.from_pretrained(root)


# -- omnigen2_sampling ----------------------------------------------------------------------------------------


def sampling_valid(key: str, value) -> bool:
    """The documented rule, written out independently of the loader: the size multiple of the fixture is 16."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in ("num_inference_steps", "reflect_candidates"):
        return is_int and value >= 1
    if key in ("height", "width"):
        return is_int and value >= 16
    number = is_int or isinstance(value, float)
    return number and math.isfinite(value) and value >= 0


@settings(max_examples=30)
@given(
    values=st.dictionaries(
        st.sampled_from(checkpoint_check.SAMPLING_KEYS),
        st.one_of(
            st.integers(-5, 2000),
            st.floats(allow_nan=True, allow_infinity=True),
            st.booleans(),
            st.none(),
            st.text(max_size=3),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_sampling_defaults_load_or_are_refused_naming_the_field(fixture_ckpt, values):
    with damaged_copy(fixture_ckpt) as root:
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps({**index, "omnigen2_sampling": values}))
        error = check(root)
        bad = [k for k, v in values.items() if not sampling_valid(k, v)]
        assert (error is None) == (not bad), (values, error)
        if error is not None:
            assert any(f"omnigen2_sampling.{k} is" in str(error) for k in bad), error


@pytest.mark.parametrize("sampling", [{"num_inference_step": 3}, [1, 2], "fast"])
def test_sampling_defaults_unknown_key_or_not_an_object(fixture_ckpt, sampling):
    with damaged_copy(fixture_ckpt) as root:
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps({**index, "omnigen2_sampling": sampling}))
        with pytest.raises(CheckpointError, match="omnigen2_sampling (has unknown keys|must be an object)"):
            OmniGen2Pipeline.from_pretrained(root)


def test_sampling_defaults_valid_end_to_end(fixture_ckpt):
    with damaged_copy(fixture_ckpt) as root:
        index = json.loads((root / "model_index.json").read_text())
        values = {"num_inference_steps": 3, "text_guidance_scale": 0, "height": 48, "width": 32}
        (root / "model_index.json").write_text(json.dumps({**index, "omnigen2_sampling": values}))
        assert OmniGen2Pipeline.from_pretrained(root).sampling_defaults == values


# -- the reflection adapter -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_source() -> Path:
    return Path(checkpoint_check.__file__).parent / "builtin" / "shapes" / "mllm_reflection"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "adapter_model.safetensors is not a readable safetensors file"),
        ("nan", "tensor '.*' holds non-finite values"),
        ("half pair", "lora_A without its lora_B"),
        ("config junk", "adapter_config.json is not valid JSON"),
        ("rank text", "adapter_config.json: field 'r' is 'x'"),
        ("no targets", "adapter_config.json lacks the field 'target_modules'"),
        ("no weights", "has adapter_config.json but no adapter_model.safetensors"),
    ],
)
def test_damaged_reflection_adapter(fixture_ckpt, adapter_source, damage, message):
    with damaged_copy(fixture_ckpt) as root:
        folder = Path(shutil.copytree(adapter_source, root / "mllm_reflection", copy_function=shutil.copyfile))
        assert load_reflection_adapter(root)["config"]["r"] == 64  # the undamaged copy loads
        weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-10])
        elif damage in ("nan", "half pair"):
            tensors, metadata = stored(weights)
            key = sorted(tensors)[0]
            if damage == "nan":
                tensors[key][0, 0] = float("nan")
            else:
                del tensors[key.replace("lora_A", "lora_B")]
            save_file(tensors, str(weights), metadata=metadata)
        elif damage == "config junk":
            config_file.write_text("{r: 4")
        elif damage == "rank text":
            config_file.write_text(json.dumps({**config, "r": "x"}))
        elif damage == "no targets":
            config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "target_modules"}))
        else:
            weights.unlink()
        with pytest.raises(CheckpointError, match=message):
            load_reflection_adapter(root)
