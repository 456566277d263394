"""Checking a pipeline directory before anything is allocated.

For each model component (transformer, vae, mllm): ``config.json`` is parsed and its fields type- and
range-checked (the bounds refuse an absurd but self-consistent config before a model is built); the model is then
built on the meta device (no memory) to learn every tensor it expects; every shard's safetensors header and the
shard index are read; every expected tensor must be present with its shape. The total size at the load dtype is
compared with the memory the machine has. Sampling defaults (``model_index.json``'s ``omnigen2_sampling``) and the
tokenizer files are checked too. Every refusal is a ``CheckpointError`` naming the file, field or tensor.

Extra tensors (in the checkpoint, not in the model) only warn: they cannot change what the model computes, and a
misnamed tensor is caught anyway, as the tensor it should have been is then missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

# A component above this many parameters is refused whatever memory the machine has: the released transformer and
# MLLM have about 4e9 each. Raise it (omnigen2.checkpoint_check.MAX_PARAMETERS) for a larger model.
MAX_PARAMETERS = 10**11
WEIGHTS_NAME = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "mllm": "model"}
# diffusers prefers the index when both a single file and an index exist; transformers the single file.
INDEX_FIRST = {"transformer": True, "vae": True, "mllm": False}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
SAMPLING_KEYS = (
    "num_inference_steps",
    "text_guidance_scale",
    "image_guidance_scale",
    "height",
    "width",
    "reflect_candidates",
)


@dataclass(frozen=True)
class Field:
    """A config field: ``kind`` is int, float, bool, str, ints or strs (lists); ``lo``/``hi`` bound a number or
    each list element; ``length`` bounds a list; ``null`` allows JSON null."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    null: bool = False
    length: tuple[int, int] | None = None


def _int(lo, hi, null=False) -> Field:
    return Field("int", lo, hi, null)


def _float(lo, hi, null=False) -> Field:
    return Field("float", lo, hi, null)


BOOL, STR = Field("bool"), Field("str")
# Bounds are far above any released model (OmniGen2: hidden 2520, 32 layers; Qwen2.5-VL-72B: hidden 8192,
# 80 layers) and low enough that building the model on the meta device takes at most a second or two.
TRANSFORMER_FIELDS = {
    "patch_size": _int(1, 16),
    "in_channels": _int(1, 1024),
    "out_channels": _int(1, 1024, null=True),
    "hidden_size": _int(1, 32768),
    "num_layers": _int(1, 512),
    "num_refiner_layers": _int(0, 64),
    "num_attention_heads": _int(1, 512),
    "num_kv_heads": _int(1, 512),
    "multiple_of": _int(1, 65536),
    "ffn_dim_multiplier": _float(1e-3, 64, null=True),
    "norm_eps": _float(0, 1),
    "axes_dim_rope": Field("ints", 0, 4096, length=(3, 3)),
    "axes_lens": Field("ints", 1, 2**20, length=(3, 3)),
    "text_feat_dim": _int(1, 32768),
    "timestep_scale": _float(1e-6, 1e6),
}
VAE_FIELDS = {
    "in_channels": _int(1, 64),
    "out_channels": _int(1, 64),
    "latent_channels": _int(1, 1024),
    "block_out_channels": Field("ints", 1, 8192, length=(1, 8)),
    "down_block_types": Field("strs", length=(1, 8)),
    "up_block_types": Field("strs", length=(1, 8)),
    "layers_per_block": _int(1, 16),
    "norm_num_groups": _int(1, 1024),
    "act_fn": STR,
    "scaling_factor": _float(1e-6, 1e6),
    "shift_factor": _float(-1e6, 1e6, null=True),
    "force_upcast": BOOL,
    "mid_block_add_attention": BOOL,
    "use_quant_conv": BOOL,
    "use_post_quant_conv": BOOL,
}
MLLM_TEXT_FIELDS = {
    "hidden_size": _int(1, 32768),
    "intermediate_size": _int(1, 262144),
    "num_hidden_layers": _int(1, 512),
    "num_attention_heads": _int(1, 512),
    "num_key_value_heads": _int(1, 512),
    "vocab_size": _int(1, 2**21),
    "max_position_embeddings": _int(1, 2**24),
    "rms_norm_eps": _float(0, 1),
    "tie_word_embeddings": BOOL,
}
MLLM_VISION_FIELDS = {
    "depth": _int(1, 256),
    "hidden_size": _int(1, 32768),
    "intermediate_size": _int(1, 262144),
    "num_heads": _int(1, 512),
    "out_hidden_size": _int(1, 32768),
    "patch_size": _int(1, 64),
    "spatial_merge_size": _int(1, 16),
    "temporal_patch_size": _int(1, 16),
    "in_channels": _int(1, 16),
    "window_size": _int(1, 8192),
    "fullatt_block_indexes": Field("ints", 0, 255, length=(0, 256)),
}
MLLM_TOP_FIELDS = {
    name: _int(0, 2**21)
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
}


@dataclass(frozen=True)
class StoredTensor:
    file: str  # the shard's file name
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


# -- JSON and config fields -------------------------------------------------------------------------------------


def read_json(path: Path, kind: type = dict):
    """The parsed JSON file, which must hold a ``kind`` (an object by default)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, kind):
        raise CheckpointError(f"{path} must hold a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def _number_ok(v, spec: Field, integer: bool) -> bool:
    """``v`` is an int (or, unless ``integer``, a finite float) within ``spec``'s bounds; true/false is no number."""
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return (spec.lo is None or v >= spec.lo) and (spec.hi is None or v <= spec.hi)


def _field_problem(value, spec: Field) -> str | None:
    """Why ``value`` does not fit ``spec``, or None."""
    if value is None:
        return None if spec.null else "must not be null"
    bounds = f" in [{spec.lo:g}, {spec.hi:g}]" if spec.lo is not None else ""
    if spec.kind in ("int", "float"):
        ok = _number_ok(value, spec, spec.kind == "int")
        return None if ok else f"must be {'an integer' if spec.kind == 'int' else 'a finite number'}{bounds}"
    if spec.kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if spec.kind == "str":
        return None if isinstance(value, str) else "must be a string"
    if not isinstance(value, list) or not spec.length[0] <= len(value) <= spec.length[1]:
        return f"must be a list of {spec.length[0]} to {spec.length[1]} entries"
    if spec.kind == "strs":
        return None if all(isinstance(v, str) for v in value) else "must hold strings only"
    return None if all(_number_ok(v, spec, True) for v in value) else f"must hold integers{bounds} only"


def check_fields(file: Path, data: dict, fields: dict[str, Field], prefix: str = "") -> None:
    """Refuse a field of ``data`` (read from ``file``) of the wrong type or out of range; absent fields take the
    model's defaults, fields not in ``fields`` are left to the library."""
    for name, spec in fields.items():
        if name in data:
            problem = _field_problem(data[name], spec)
            if problem:
                raise CheckpointError(f"{file}: field {prefix + name!r} is {data[name]!r}; it {problem}")


def check_config(comp: str, file: Path) -> dict:
    config = read_json(file)
    if comp == "transformer":
        check_fields(file, config, TRANSFORMER_FIELDS)
    elif comp == "vae":
        check_fields(file, config, VAE_FIELDS)
    else:
        check_fields(file, config, MLLM_TOP_FIELDS)
        check_fields(file, config, MLLM_TEXT_FIELDS)  # older configs keep the text fields at the top level
        for sub, fields in (("text_config", MLLM_TEXT_FIELDS), ("vision_config", MLLM_VISION_FIELDS)):
            if sub in config:
                if not isinstance(config[sub], dict):
                    raise CheckpointError(f"{file}: field {sub!r} must be an object, got {config[sub]!r}")
                check_fields(file, config[sub], fields, prefix=f"{sub}.")
    return config


# -- safetensors headers and shard indexes ----------------------------------------------------------------------


@contextlib.contextmanager
def open_safetensors(path: Path):
    """``safetensors.safe_open`` (pt); a file safetensors cannot read (too short for its header, a bad header
    length or JSON, an unknown dtype, data offsets that do not tile the file exactly: truncated or padded) is a
    CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor's dtype and shape from a safetensors file, without reading the data."""
    with open_safetensors(path) as f:
        out = {}
        for name in f.keys():
            part = f.get_slice(name)
            out[name] = StoredTensor(Path(path).name, part.get_dtype(), tuple(part.get_shape()))
        return out


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a ``*.safetensors.index.json``. Shard names must be
    plain file names in the same folder: a path such as ``../x`` is refused."""
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: 'weight_map' must be a non-empty mapping of tensor -> shard file")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise CheckpointError(
                f"{path}: tensor {tensor!r} maps to {shard!r}, which is not a .safetensors file name in this folder"
            )
        if shard in (".", "..") or "\\" in shard:
            raise CheckpointError(f"{path}: shard name {shard!r} is not a plain file name")
    return weight_map


def weight_source(folder: Path, comp: str) -> Path:
    """The index or single safetensors file the library will read for ``comp``."""
    single = folder / f"{WEIGHTS_NAME[comp]}.safetensors"
    index = folder / f"{WEIGHTS_NAME[comp]}.safetensors.index.json"
    order = (index, single) if INDEX_FIRST[comp] else (single, index)
    for candidate in order:
        if candidate.is_file():
            return candidate
    found = sorted(f.name for f in folder.glob("*.safetensors"))
    raise CheckpointError(
        f"{folder} lacks {single.name} (or {index.name}), the file the {comp} is loaded from; found: "
        f"{', '.join(found) or 'nothing'}"
    )


def stored_tensors(folder: Path, comp: str) -> dict[str, StoredTensor]:
    """Every tensor the checkpoint holds for ``comp``, from the shard headers (through the index if sharded);
    a tensor the index lists must be in the shard it names."""
    source = weight_source(folder, comp)
    if not source.name.endswith(".index.json"):
        return read_header(source)
    weight_map = read_index(source)
    headers = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise CheckpointError(f"{source} lists shards that are missing: {shard}")
        headers[shard] = read_header(folder / shard)
    out = {}
    for tensor, shard in weight_map.items():
        if tensor not in headers[shard]:
            raise CheckpointError(f"{source} places tensor {tensor!r} in {folder / shard}, which does not hold it")
        out[tensor] = headers[shard][tensor]
    return out


# -- the expected tensors, from the model built on the meta device ----------------------------------------------


@dataclass
class Expected:
    tensors: dict[str, tuple[tuple[int, ...], bool]]  # name -> (shape, floating)
    optional: set[str]  # tied copies: loaded if present, derived if not
    rename: object  # checkpoint key -> (model key, whether a converter reshapes it); None: names not checkable


def _meta_model(comp: str, cls, folder: Path, config: dict):
    """``cls`` built from ``config`` on the meta device: no memory is allocated, whatever the sizes."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if comp == "mllm":
                return cls(cls.config_class.from_dict(config))
            return cls.from_config(config)
    except Exception as e:  # any inconsistency the library's constructor finds
        raise CheckpointError(
            f"{folder / 'config.json'}: the {comp} cannot be built from this config ({type(e).__name__}: {e})"
        ) from e


def expected_tensors(comp: str, cls, folder: Path, config: dict) -> Expected:
    model = _meta_model(comp, cls, folder, config)
    state = model.state_dict()  # parameters and persistent buffers: exactly what a checkpoint holds
    tensors = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}
    if comp != "mllm":

        def rename(keys):
            # diffusers renames deprecated attention-block names on load; replay it on a name -> name dict
            mapping = {k: k for k in keys}
            model._fix_state_dict_keys_on_load(mapping)
            return {v: (k, False) for k, v in mapping.items()}

        return Expected(tensors, set(), rename)
    return Expected(tensors, set(getattr(model, "all_tied_weights_keys", None) or {}), _transformers_rename(model))


def _transformers_rename(model):
    """Checkpoint keys -> model keys as transformers renames them on load (e.g. the released Qwen2.5-VL keys
    ``model.layers.*`` -> ``model.language_model.layers.*``, ``visual.*`` -> ``model.visual.*``). These are
    transformers' internal functions: with a version that lacks them, None (the tensor names are then checked
    after loading, from transformers' own list of missing keys)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix

    def rename(keys):
        out = {}
        for key in keys:
            new, converter = rename_source_key(key, renamings, converters, prefix, meta)
            if new not in meta and key in meta:  # as transformers: keep a key that needed no renaming
                new, converter = rename_source_key(key, [], [], prefix, meta)
            out[key] = (new, converter is not None)
        return out

    return rename


def _size_fields(config: dict, fields: dict[str, Field]) -> str:
    return ", ".join(f"{k}={config[k]}" for k, f in fields.items() if f.kind == "int" and k in config)


def check_tensors(comp: str, folder: Path, expected: Expected, stored: dict[str, StoredTensor]) -> None:
    """Every expected tensor present with its shape (and a floating dtype where the model's is); extras warn."""
    if expected.rename is None:
        return
    renamed = expected.rename(stored.keys())
    found = {}
    for key, (name, converted) in renamed.items():
        found[name] = (key, stored[key], converted)
    missing = [k for k in expected.tensors if k not in found and k not in expected.optional]
    if missing:
        raise CheckpointError(
            f"{comp}: {len(missing)} tensor(s) the model of {folder / 'config.json'} needs are not in {folder}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; they would load as random initialisation"
        )
    for name, (key, t, converted) in found.items():
        if name not in expected.tensors or converted:
            continue
        shape, floating = expected.tensors[name]
        if t.shape != shape:
            raise CheckpointError(
                f"{comp}: tensor {key!r} in {folder / t.file} has shape {list(t.shape)}, the model expects "
                f"{list(shape)} (from {folder / 'config.json'})"
            )
        if floating and t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{comp}: tensor {key!r} in {folder / t.file} has dtype {t.dtype}, not a float")
    extra = sorted(k for k, (name, _) in renamed.items() if name not in expected.tensors)
    if extra:
        warnings.warn(
            f"{comp}: {len(extra)} tensor(s) in {folder} are not used by the model and are ignored: "
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}",
            stacklevel=3,
        )


def check_component(comp: str, cls, folder: Path) -> Expected:
    """Config, headers and tensors of one model component; returns what it expects."""
    config_file = folder / "config.json"
    config = check_config(comp, config_file)
    expected = expected_tensors(comp, cls, folder, config)
    count = sum(math.prod(shape) for k, (shape, _) in expected.tensors.items() if k not in expected.optional)
    if count > MAX_PARAMETERS:
        fields = {"transformer": TRANSFORMER_FIELDS, "vae": VAE_FIELDS}.get(comp, MLLM_TEXT_FIELDS)
        sizes = _size_fields(config.get("text_config", config), fields) or _size_fields(config, fields)
        raise CheckpointError(
            f"{config_file} describes a {comp} of {count:,} parameters, above the limit of {MAX_PARAMETERS:,} "
            f"({sizes}); raise omnigen2.checkpoint_check.MAX_PARAMETERS if this is intended"
        )
    check_tensors(comp, folder, expected, stored_tensors(folder, comp))
    return expected


# -- memory -----------------------------------------------------------------------------------------------------


def available_memory(device: torch.device | None) -> tuple[int, str] | None:
    """(bytes free, where the figure comes from) on ``device``'s memory: the GPU's free memory for CUDA, else the
    host's available RAM; None where it cannot be told."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available physical pages"
    except (ValueError, OSError, AttributeError):
        return None


def model_bytes(expected: Expected, dtype: torch.dtype) -> int:
    """Bytes of the loaded model: floating tensors at the load dtype, others at their own (taken as 8)."""
    size = torch.finfo(dtype).bits // 8
    return sum(
        math.prod(shape) * (size if floating else 8)
        for k, (shape, floating) in expected.tensors.items()
        if k not in expected.optional
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(sizes: dict[str, int], dtype: torch.dtype, device: torch.device | None) -> None:
    """Refuse to load what does not fit: weights load on the host first, then move to ``device``."""
    need = sum(sizes.values())
    places = [None] + ([device] if device is not None and device.type == "cuda" else [])
    for place in places:
        free = available_memory(place)
        if free is None or need <= free[0]:
            continue
        parts = ", ".join(f"{c} {_gib(n)}" for c, n in sizes.items())
        raise CheckpointError(
            f"the checkpoint needs about {_gib(need)} at {str(dtype).replace('torch.', '')} ({parts}) but only "
            f"{_gib(free[0])} is available ({free[1]}); use a smaller torch_dtype, free memory, or pass "
            "check_memory=False (e.g. to load for CPU offload)"
        )


# -- sampling defaults and the tokenizer ------------------------------------------------------------------------


def check_sampling(index_file: Path, sampling, size_multiple: int | None) -> None:
    """``omnigen2_sampling``: the settings the pipeline takes when a call leaves them unset."""
    where = f"{index_file}: omnigen2_sampling"
    if not isinstance(sampling, dict):
        raise CheckpointError(f"{where} must be an object, got {sampling!r}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise CheckpointError(f"{where} has unknown keys {unknown}; known: {', '.join(SAMPLING_KEYS)}")
    specs = {
        "num_inference_steps": _int(1, None),
        "reflect_candidates": _int(1, None),
        "text_guidance_scale": _float(0, None),
        "image_guidance_scale": _float(0, None),
        "height": _int(size_multiple or 1, None),
        "width": _int(size_multiple or 1, None),
    }
    for name, value in sampling.items():
        spec = specs[name]
        if not _number_ok(value, spec, spec.kind == "int"):
            kind = "an integer" if spec.kind == "int" else "a finite number"
            raise CheckpointError(f"{where}.{name} is {value!r}; it must be {kind} >= {spec.lo:g}")


def size_multiple(vae_config: dict, transformer_config: dict) -> int:
    """The pipeline's ``size_multiple``: generated sides are floored to it (see OmniGen2Pipeline.__init__)."""
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    return math.lcm(16, vae_factor * transformer_config.get("patch_size", 2))


def check_processor(folder: Path) -> None:
    """The processor's JSON files parse, and ``tokenizer.json`` loads in the tokenizers library."""
    for file in sorted(folder.glob("*.json")):
        read_json(file, object)
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises plain Exception for a malformed file
            raise CheckpointError(f"{tokenizer_file} is not a valid tokenizer file ({e})") from e
