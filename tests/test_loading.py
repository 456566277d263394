"""Loading and saving the released checkpoint layout (``omnigen2.loading``, ``OmniGen2Pipeline.from/save_pretrained``).

Everything runs on the official-tiny checkpoint (same layout as ``OmniGen2/OmniGen2``); broken layouts are
built by copying it into ``tmp_path`` and damaging the copy. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omnigen2 import OmniGen2Pipeline
from omnigen2.loading import COMPONENTS, CheckpointError, parse_device, parse_dtype

MODEL_FOLDERS = ("transformer", "vae", "mllm")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the hub: offline mode on, and an empty private hub cache."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def checkpoint(official_tiny) -> Path:
    return official_tiny / "checkpoint"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of the (read-only) fixture checkpoint."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, dirs, _ in os.walk(dst):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
    os.chmod(dst, 0o755)
    return dst


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path) -> Path:
    return copy_checkpoint(checkpoint, tmp_path / "ckpt")


def read_index(root: Path) -> dict:
    return json.loads((root / "model_index.json").read_text())


def write_index(root: Path, index: dict) -> None:
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def load(path, **kwargs) -> OmniGen2Pipeline:
    pipe = OmniGen2Pipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def config_dict(config) -> dict:
    d = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
    d.pop("_name_or_path", None)  # where it was loaded from: differs by construction
    return d


def generate(pipe, **kwargs) -> torch.Tensor:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    args = dict(prompt="A red circle.", height=64, width=64, num_inference_steps=2, latents=latents, output_type="pt")
    args.update(kwargs)
    return pipe(**args).images


# -- loading by class name ---------------------------------------------------------------------------------------


def test_fixture_loads_by_class_name_without_importing_checkpoint_modules(checkpoint):
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLForConditionalGeneration

    from omnigen2.models import OmniGen2Transformer2DModel
    from omnigen2.schedulers import FlowMatchEulerDiscreteScheduler

    index = read_index(checkpoint)
    assert index["transformer"][0] == "transformer_omnigen2"  # the module the loader must not import
    pipe = load(checkpoint)
    assert "transformer_omnigen2" not in sys.modules
    assert "scheduling_flow_match_euler_discrete" not in sys.modules
    assert type(pipe.transformer) is OmniGen2Transformer2DModel
    assert type(pipe.vae) is AutoencoderKL
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert type(pipe.mllm) is Qwen2_5_VLForConditionalGeneration
    assert pipe.scheduler.config.dynamic_time_shift is True
    assert pipe.transformer.config.hidden_size == 64
    # the weights are the checkpoint's, not a fresh initialisation
    vae_sd = load_file(checkpoint / "vae" / "diffusion_pytorch_model.safetensors")
    for k, v in vae_sd.items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k
    for comp in MODEL_FOLDERS:
        assert not getattr(pipe, comp).training, comp
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert chat == "<|im_start|>user\nx<|im_end|>\n"  # the checkpoint's template, not a default one


def test_code_placed_in_checkpoint_is_never_executed(ckpt_copy, tmp_path, monkeypatch):
    sentinel = tmp_path / "executed"
    payload = f"open({str(sentinel)!r}, 'w').write('pwned')\nraise RuntimeError('checkpoint code ran')\n"
    for folder in (ckpt_copy, ckpt_copy / "transformer", ckpt_copy / "scheduler"):
        for module in ("transformer_omnigen2", "scheduling_flow_match_euler_discrete", "pipeline_omnigen2"):
            (folder / f"{module}.py").write_text(payload)
    monkeypatch.syspath_prepend(str(ckpt_copy))  # even importable, they must not be imported
    pipe = load(ckpt_copy)
    assert not sentinel.exists()
    assert "transformer_omnigen2" not in sys.modules
    assert "scheduling_flow_match_euler_discrete" not in sys.modules
    assert pipe.transformer.config.num_layers == 2


def test_scheduler_class_is_taken_from_model_index(ckpt_copy):
    from omnigen2.schedulers import DPMSolverMultistepScheduler

    index = read_index(ckpt_copy)
    index["scheduler"] = ["scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler"]
    write_index(ckpt_copy, index)
    pipe = load(ckpt_copy)
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert pipe.scheduler.config.dynamic_time_shift is True


def test_dtype_and_overrides(checkpoint, tiny_pipe):
    pipe = load(checkpoint, torch_dtype="bf16")
    for comp in MODEL_FOLDERS:
        assert getattr(pipe, comp).dtype == torch.bfloat16, comp
    pipe = load(checkpoint, torch_dtype=torch.float32, vae=tiny_pipe.vae)
    assert pipe.vae is tiny_pipe.vae
    assert pipe.transformer is not tiny_pipe.transformer
    with pytest.raises(TypeError, match="unexpected arguments: vea"):
        OmniGen2Pipeline.from_pretrained(checkpoint, vea=tiny_pipe.vae)


def test_override_does_not_need_the_component_on_disk(ckpt_copy, tiny_pipe):
    shutil.rmtree(ckpt_copy / "vae")
    index = read_index(ckpt_copy)
    del index["mllm"]
    write_index(ckpt_copy, index)
    pipe = load(ckpt_copy, vae=tiny_pipe.vae, mllm=tiny_pipe.mllm)
    assert pipe.vae is tiny_pipe.vae and pipe.mllm is tiny_pipe.mllm
    # without the override the same directory is refused
    with pytest.raises(CheckpointError, match="lacks the components: mllm"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy, vae=tiny_pipe.vae)


# -- save_pretrained -> from_pretrained ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def roundtrip(official_tiny, tmp_path_factory):
    original = load(official_tiny / "checkpoint")
    saved = tmp_path_factory.mktemp("roundtrip") / "saved"
    # small shards, so that both sharded components come back sharded as in the released layout
    original.save_pretrained(saved, max_shard_size="400KB")
    reloaded = load(saved)
    return original, reloaded, saved


@pytest.mark.parametrize("comp", MODEL_FOLDERS)
def test_roundtrip_weights_and_config_identical(roundtrip, comp):
    original, reloaded, _ = roundtrip
    a, b = getattr(original, comp), getattr(reloaded, comp)
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert config_dict(a.config) == config_dict(b.config)


def test_roundtrip_scheduler_and_tokenizer(roundtrip):
    original, reloaded, _ = roundtrip
    assert type(original.scheduler) is type(reloaded.scheduler)
    # diffusers' own bookkeeping of which fields were missing from the file (filled with defaults) is not config
    settings = [
        {k: v for k, v in s.config.items() if k != "_use_default_values"}
        for s in (original.scheduler, reloaded.scheduler)
    ]
    assert settings[0] == settings[1]
    tok_a, tok_b = original.tokenizer, reloaded.tokenizer
    img_id = tok_a.convert_tokens_to_ids("<|img|>")
    assert tok_a("<|img|>").input_ids == [img_id]  # one special token, not split into pieces
    assert tok_b.convert_tokens_to_ids("<|img|>") == img_id
    texts = [
        "A red circle.",
        "<|img|>",
        "Put the cat from <|img|> next to the dog in <|img|>.",
        "<|im_start|>user\nhi<|im_end|>\n",
        original.apply_chat_template("Make the sky <|img|> blue."),
    ]
    assert reloaded.apply_chat_template("Make the sky <|img|> blue.") == texts[-1]
    for text in texts:
        assert tok_a(text).input_ids == tok_b(text).input_ids, text
    assert tok_a.pad_token_id == tok_b.pad_token_id
    assert tok_a.eos_token_id == tok_b.eos_token_id


def test_roundtrip_generation_bitwise_identical(roundtrip, official_tiny):
    original, reloaded, _ = roundtrip
    a, b = generate(original), generate(reloaded)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    image = Image.open(official_tiny / "cases" / "in_a.png").convert("RGB")
    a = generate(original, prompt="Make it blue.", input_images=[image], height=None, width=None)
    b = generate(reloaded, prompt="Make it blue.", input_images=[image], height=None, width=None)
    assert torch.equal(a, b)


def test_saved_model_index_has_released_entries(roundtrip, checkpoint):
    _, _, saved = roundtrip
    index = read_index(saved)
    assert index["_class_name"] == "OmniGen2Pipeline"
    assert index["transformer"] == ["transformer_omnigen2", "OmniGen2Transformer2DModel"]
    assert index["scheduler"] == ["scheduling_flow_match_euler_discrete", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["mllm"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["processor"] == ["transformers", "Qwen2_5_VLProcessor"]
    released = read_index(checkpoint)
    assert {c: index[c] for c in COMPONENTS} == {c: released[c] for c in COMPONENTS}


def _layout(root: Path) -> dict[str, set[str]]:
    return {
        str(p.relative_to(root)): {f.name for f in p.iterdir() if f.is_file()}
        for p in sorted(root.iterdir())
        if p.is_dir()
    }


def test_saved_layout_matches_released(roundtrip, checkpoint):
    _, _, saved = roundtrip
    released, ours = _layout(checkpoint), _layout(saved)
    assert set(ours) == set(released) == set(COMPONENTS)
    assert {f.name for f in saved.iterdir() if f.is_file()} == {"model_index.json"}
    assert not list(saved.parent.glob("*.tmp-save")) and not list(saved.parent.glob("*.old-save"))
    for comp in COMPONENTS:
        files = ours[comp]
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))], comp
        weights_a = {f for f in released[comp] if ".safetensors" in f}
        weights_b = {f for f in files if ".safetensors" in f}
        # every non-weight file of the released folder is written again (processor: also the image-processor
        # config and chat template the tokenizer itself does not write)
        assert released[comp] - weights_a <= files - weights_b, comp
        indexes = [f for f in weights_b if f.endswith(".safetensors.index.json")]
        assert len(indexes) == bool([f for f in weights_a if f.endswith(".index.json")]), comp
        if comp in MODEL_FOLDERS:
            assert "config.json" in files
            shards = weights_b - set(indexes)
            assert shards, comp
            if indexes:
                weight_map = json.loads((saved / comp / indexes[0]).read_text())["weight_map"]
                assert set(weight_map.values()) == shards, comp
    assert "scheduler_config.json" in ours["scheduler"]
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= ours["processor"]
    assert json.loads((saved / "processor" / "preprocessor_config.json").read_text()) == json.loads(
        (checkpoint / "processor" / "preprocessor_config.json").read_text()
    )


def test_save_over_itself_and_sampling_defaults_roundtrip(ckpt_copy):
    index = read_index(ckpt_copy)
    index["omnigen2_sampling"] = {"num_inference_steps": 2, "text_guidance_scale": 3.0}
    index["note"] = "kept"
    write_index(ckpt_copy, index)
    pipe = load(ckpt_copy)
    assert pipe.sampling_defaults == {"num_inference_steps": 2, "text_guidance_scale": 3.0}
    before = generate(pipe, num_inference_steps=None)  # steps from the checkpoint's defaults
    assert not torch.equal(before, generate(pipe, num_inference_steps=3))
    # the directory the pipeline came from is replaced in one piece by the save
    pipe.save_pretrained(ckpt_copy)
    assert not list(ckpt_copy.parent.glob("*.tmp-save")) and not list(ckpt_copy.parent.glob("*.old-save"))
    saved_index = read_index(ckpt_copy)
    assert saved_index["omnigen2_sampling"] == index["omnigen2_sampling"]
    assert saved_index["note"] == "kept"
    again = load(ckpt_copy)
    assert again.sampling_defaults == pipe.sampling_defaults
    assert torch.equal(before, generate(again, num_inference_steps=None))


def test_a_save_that_fails_keeps_the_old_directory_and_leaves_no_temporary(ckpt_copy, monkeypatch):
    import errno

    pipe = load(ckpt_copy)
    before = {p.relative_to(ckpt_copy): p.read_bytes() for p in ckpt_copy.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipe.vae, "save_pretrained", disk_full)  # after the transformer's shards were written
    with pytest.raises(OSError, match=f"could not save the pipeline to {ckpt_copy}: No space left") as err:
        pipe.save_pretrained(ckpt_copy)
    assert err.value.errno == errno.ENOSPC
    assert not list(ckpt_copy.parent.glob("*.tmp-save")) and not list(ckpt_copy.parent.glob("*.old-save"))
    after = {p.relative_to(ckpt_copy): p.read_bytes() for p in ckpt_copy.rglob("*") if p.is_file()}
    assert after == before


# -- pickle weights ------------------------------------------------------------------------------------------


def _vae_to_pickle(ckpt: Path, name: str = "diffusion_pytorch_model.bin") -> dict:
    sd = load_file(ckpt / "vae" / "diffusion_pytorch_model.safetensors")
    torch.save(sd, ckpt / "vae" / name)
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return sd


def test_pickle_only_weights_refused(ckpt_copy):
    _vae_to_pickle(ckpt_copy)
    with pytest.raises(CheckpointError, match=r"vae holds only pickle weights \(diffusion_pytorch_model\.bin\)") as e:
        OmniGen2Pipeline.from_pretrained(ckpt_copy)
    assert "allow_pickle=True" in str(e.value)


def test_pickle_only_weights_accepted_with_allow_pickle(ckpt_copy):
    sd = _vae_to_pickle(ckpt_copy)
    pipe = load(ckpt_copy, allow_pickle=True)
    loaded = pipe.vae.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_other_pickle_suffix_refused(ckpt_copy):
    sd = load_file(ckpt_copy / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    torch.save(sd, ckpt_copy / "transformer" / "model.pt")
    for f in (ckpt_copy / "transformer").glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"only pickle weights \(model\.pt\)"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_stray_pickle_beside_safetensors_is_ignored(ckpt_copy, checkpoint):
    # not a loadable file at all: if the loader picked it over the safetensors, loading would fail
    (ckpt_copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    (ckpt_copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    pipe = load(ckpt_copy)
    expected = load_file(checkpoint / "vae" / "diffusion_pytorch_model.safetensors")
    for k, v in expected.items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k


# -- broken layouts --------------------------------------------------------------------------------------------


def test_directory_without_model_index(ckpt_copy):
    (ckpt_copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="has no model_index.json"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="has no model_index.json: not an OmniGen2 pipeline directory"):
        OmniGen2Pipeline.from_pretrained(tmp_path)


def test_model_index_not_json(ckpt_copy):
    (ckpt_copy / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model_index.json is not valid JSON"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("comp", COMPONENTS)
def test_model_index_missing_component(ckpt_copy, comp):
    index = read_index(ckpt_copy)
    del index[comp]
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match=f"lacks the components: {comp}$"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_model_index_malformed_entry(ckpt_copy):
    index = read_index(ckpt_copy)
    index["vae"] = "AutoencoderKL"
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match=r"entry 'vae' must be \[module, ClassName\]"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize(
    "comp, entry",
    [
        ("transformer", ["transformer_omnigen2", "OmniGen2Transformer2DModelV2"]),
        ("vae", ["diffusers", "AutoencoderKLWan"]),
        ("scheduler", ["diffusers", "DDIMScheduler"]),
        ("mllm", ["transformers", "LlamaForCausalLM"]),
    ],
)
def test_model_index_unknown_class(ckpt_copy, comp, entry):
    index = read_index(ckpt_copy)
    index[comp] = entry
    write_index(ckpt_copy, index)
    with pytest.raises(CheckpointError, match=f"{comp} class '{entry[1]}' is not one this loader knows"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("comp", COMPONENTS)
def test_missing_component_folder(ckpt_copy, comp):
    shutil.rmtree(ckpt_copy / comp)
    with pytest.raises(CheckpointError, match=f"lacks the folder {comp}/ named in model_index.json"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("comp", MODEL_FOLDERS)
def test_missing_config(ckpt_copy, comp):
    (ckpt_copy / comp / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{comp} lacks config.json"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_missing_scheduler_config(ckpt_copy):
    (ckpt_copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler lacks scheduler_config.json"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_missing_tokenizer(ckpt_copy):
    (ckpt_copy / "processor" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="processor lacks tokenizer.json"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


def test_missing_weights(ckpt_copy):
    (ckpt_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vae weights missing: no .safetensors file"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


@pytest.mark.parametrize(
    "comp, shard",
    [
        ("transformer", "diffusion_pytorch_model-00002-of-00002.safetensors"),
        ("mllm", "model-00001-of-00002.safetensors"),
    ],
)
def test_sharded_index_lists_missing_shard(ckpt_copy, comp, shard):
    (ckpt_copy / comp / shard).unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are missing: {shard}"):
        OmniGen2Pipeline.from_pretrained(ckpt_copy)


# -- what the path names ---------------------------------------------------------------------------------------


def test_path_is_a_file(checkpoint):
    with pytest.raises(CheckpointError, match="is a file; give the pipeline directory that holds model_index.json"):
        OmniGen2Pipeline.from_pretrained(checkpoint / "model_index.json")


@pytest.mark.parametrize("name", ["no-such-checkpoint-dir", "./missing/dir", "a/b/c", "/no/such/checkpoint"])
def test_neither_directory_nor_hub_id(name):
    with pytest.raises(CheckpointError, match="is neither a local directory nor a hub id"):
        OmniGen2Pipeline.from_pretrained(name)


def test_hub_id_offline():
    with pytest.raises(CheckpointError, match="could not fetch hub model 'omnigen2-tests/not-cached'") as e:
        OmniGen2Pipeline.from_pretrained("omnigen2-tests/not-cached")
    assert "local directory" in str(e.value)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_hub_id_resolves_through_snapshot_download(monkeypatch, checkpoint, allow_pickle):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, ignore_patterns=None, **kwargs):
        calls.append((repo_id, ignore_patterns))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = load("OmniGen2/OmniGen2", allow_pickle=allow_pickle)
    assert pipe.transformer.config.hidden_size == 64
    (repo_id, ignore), *rest = calls
    assert repo_id == "OmniGen2/OmniGen2" and not rest
    if allow_pickle:
        assert ignore is None
    else:  # pickle files are not even downloaded
        assert {"*.bin", "*.pt", "*.pth", "*.ckpt"} <= set(ignore)


def test_unknown_builtin_lists_availability():
    with pytest.raises(ValueError, match=r"no builtin model named 'nonexistent' \(available: .+\)"):
        OmniGen2Pipeline.from_pretrained("builtin:nonexistent")


# -- dtype and device ------------------------------------------------------------------------------------------


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'fp8x'"):
        OmniGen2Pipeline.from_pretrained(checkpoint, torch_dtype="fp8x")


def test_bad_device(checkpoint):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        OmniGen2Pipeline.from_pretrained(checkpoint, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(checkpoint):
    with pytest.raises(ValueError, match="CUDA is not available"):
        OmniGen2Pipeline.from_pretrained(checkpoint, device="cuda")


@pytest.mark.parametrize(
    "name, expected",
    [("fp32", torch.float32), ("BF16", torch.bfloat16), ("half", torch.float16), (None, None)],
)
def test_parse_dtype(name, expected):
    assert parse_dtype(name) == expected
    assert parse_dtype(torch.float16) == torch.float16


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None) is None
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
