"""Loading and saving the released OmniGen2 checkpoint layout.

::

    model_index.json        component -> [library or module, class name]
    transformer/            config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors [+ .index.json]
    vae/                    diffusers AutoencoderKL
    scheduler/              scheduler_config.json
    mllm/                   Qwen2_5_VLForConditionalGeneration (config.json, model*.safetensors [+ index])
    processor/              tokenizer files (+ image-processor and chat-template files)

Components are resolved by **class name** through the table below. The released ``model_index.json`` names
modules (``transformer_omnigen2``, ``scheduling_flow_match_euler_discrete``) from the original repository:
those names are never imported, and nothing named by a checkpoint is ever executed. Pickle weights
(``.bin``/``.pt``/``.ckpt``/``.pth``) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch

from . import checkpoint_check
from .errors import CheckpointError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
COMPONENTS = ("transformer", "vae", "scheduler", "mllm", "processor")
# What model_index.json is written with: the released checkpoint's own entries.
RELEASED_MODULES = {
    "transformer": "transformer_omnigen2",
    "vae": "diffusers",
    "scheduler": {
        "FlowMatchEulerDiscreteScheduler": "scheduling_flow_match_euler_discrete",
        "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    },
    "mllm": "transformers",
    "processor": "transformers",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PROCESSOR_EXTRA_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "video_preprocessor_config.json",
)
BUILTIN_PREFIX = "builtin:"
# model_index.json keys that name a plug-in, and the entry-point group whose names each may take. Installed
# packages register the names (pyproject.toml, [project.entry-points."omnigen2.reflection"]); a checkpoint only
# picks one, so nothing it names is imported by module path.
NAMED_KEYS = {"omnigen2_reflection": "omnigen2.reflection", "omnigen2_domain": "omnigen2.domains"}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 (or a torch.dtype)")


def parse_device(device) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or mps")
    return dev


def _component_classes():
    """Class name -> loader, per component. The only classes a checkpoint may name."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .models import OmniGen2Transformer2DModel
    from .schedulers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    return {
        "transformer": {"OmniGen2Transformer2DModel": OmniGen2Transformer2DModel},
        "vae": {"AutoencoderKL": AutoencoderKL},
        "scheduler": {
            "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
            "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
        },
        "mllm": {"Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration},
        "processor": {
            name: "tokenizer"
            for name in (
                "Qwen2_5_VLProcessor",
                "Qwen2VLProcessor",
                "Qwen2Tokenizer",
                "Qwen2TokenizerFast",
                "AutoTokenizer",
                "PreTrainedTokenizerFast",
                "TokenizersBackend",
            )
        },
    }


def registered(key: str) -> dict:
    """Name -> entry point of the plug-ins installed for the model_index.json ``key`` (see ``NAMED_KEYS``)."""
    return dict(_entry_points(NAMED_KEYS[key]))


@functools.cache
def _entry_points(group: str) -> tuple:
    """(name, entry point) pairs of ``group``, the first distribution's for a name; read once per process, as a
    scan of the installed distributions takes milliseconds and the domain check runs on every generation."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return tuple(found.items())


def check_named(key: str, name) -> None:
    """Refuse a ``key`` value no installed package registers, before anything is loaded."""
    known = registered(key)
    if not isinstance(name, str) or name not in known:
        raise CheckpointError(
            f"model_index.json {key!r} is {name!r}, which is not a registered name (known: "
            f"{', '.join(sorted(known)) or 'none; is omnigen2 installed, pip install -e .?'})"
        )


def resolve_named(key: str, name: str):
    """The object registered under ``name`` for the model_index.json ``key``: a reflection protocol
    (``omnigen2_reflection``) or a domain's prompt check (``omnigen2_domain``). Only registered names load."""
    check_named(key, name)
    return registered(key)[name].load()


def resolve_path(name_or_path, allow_pickle: bool = False) -> Path:
    """A local directory, a ``builtin:`` model shipped in the package, or a hub id (downloaded when online)."""
    s = os.fspath(name_or_path)
    if s.startswith(BUILTIN_PREFIX):
        from . import builtin_models

        return builtin_models.path(s[len(BUILTIN_PREFIX) :])
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{s!r} is a file; give the pipeline directory that holds model_index.json")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        ignore = None if allow_pickle else [f"*{suf}" for suf in PICKLE_SUFFIXES]
        try:
            return Path(snapshot_download(repo_id=s, ignore_patterns=ignore))
        except Exception as e:  # offline, unknown repo, gated repo, ...
            raise CheckpointError(
                f"could not fetch hub model {s!r} ({type(e).__name__}: {e}); for offline use give a local directory"
            ) from e
    raise CheckpointError(f"{s!r} is neither a local directory nor a hub id of the form 'org/name'")


def _weights_present(folder: Path, component: str, allow_pickle: bool) -> None:
    files = [f.name for f in folder.iterdir() if f.is_file()]
    safet = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    for index_name in (f for f in files if f.endswith(".safetensors.index.json")):
        missing = sorted(set(checkpoint_check.read_index(folder / index_name).values()) - set(files))
        if missing:
            raise CheckpointError(f"{folder}/{index_name} lists shards that are missing: {', '.join(missing)}")
    if safet:
        return
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); pickle files can execute code "
            "when loaded. Convert them to safetensors, or pass allow_pickle=True if you trust the source."
        )
    if not pickles:
        raise CheckpointError(f"{component} weights missing: no .safetensors file in {folder}")


def inspect_layout(root: Path, allow_pickle: bool = False, skip=()) -> dict:
    """Check the layout before loading anything; return the parsed model_index.json. Components in ``skip``
    (those the caller passes in already built) need not be in the directory."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} has no model_index.json: not an OmniGen2 pipeline directory")
    index = checkpoint_check.read_json(index_file)
    classes = _component_classes()
    needed = [c for c in COMPONENTS if c not in skip]
    missing = [c for c in needed if c not in index]
    if missing:
        raise CheckpointError(f"{index_file} lacks the components: {', '.join(missing)}")
    for comp in needed:
        entry = index[comp]
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CheckpointError(f"{index_file}: entry {comp!r} must be [module, ClassName], got {entry!r}")
        cls_name = entry[1]
        if cls_name not in classes[comp]:
            raise CheckpointError(
                f"{index_file}: {comp} class {cls_name!r} is not one this loader knows "
                f"({', '.join(classes[comp])}); nothing from the checkpoint is imported, so it cannot be loaded"
            )
        folder = root / comp
        if not folder.is_dir():
            raise CheckpointError(f"{root} lacks the folder {comp}/ named in model_index.json")
        if comp == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                raise CheckpointError(f"{folder} lacks scheduler_config.json")
        elif comp == "processor":
            if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise CheckpointError(f"{folder} lacks tokenizer.json (or vocab.json + merges.txt)")
        else:
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{folder} lacks config.json")
            _weights_present(folder, comp, allow_pickle)
    for key in NAMED_KEYS.keys() & index.keys():
        check_named(key, index[key])
    return index


def load_pipeline(
    cls,
    name_or_path,
    torch_dtype=None,
    device=None,
    allow_pickle: bool = False,
    check_memory: bool = True,
    **overrides,
):
    """Build an ``OmniGen2Pipeline`` from the released layout. ``overrides`` replace components by name. The whole
    checkpoint is checked before any model is allocated (``prevalidate``); ``check_memory=False`` skips only the
    comparison with the machine's free memory (for CPU offload)."""
    dtype = parse_dtype(torch_dtype) or torch.float32
    dev = parse_device(device)
    unknown = set(overrides) - set(COMPONENTS)
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
    root = resolve_path(name_or_path, allow_pickle)
    index = inspect_layout(root, allow_pickle, skip=overrides)
    prevalidate(root, index, overrides, dtype, dev, allow_pickle, check_memory)
    classes = _component_classes()
    parts = dict(overrides)
    if "processor" not in parts:  # cheap, and a junk tokenizer is refused before the models load
        parts["processor"] = _load_tokenizer(root / "processor")
    for comp in ("transformer", "vae", "scheduler", "mllm"):
        if comp not in parts:
            parts[comp] = _load_component(comp, classes[comp][index[comp][1]], root / comp, dtype, allow_pickle)
    for comp in ("transformer", "vae", "mllm"):
        if comp not in overrides:
            _own_aligned_memory(parts[comp])
        parts[comp].eval()
    pipe = cls(**{c: parts[c] for c in COMPONENTS})
    pipe._processor_files = {
        f: (root / "processor" / f).read_bytes() for f in PROCESSOR_EXTRA_FILES if (root / "processor" / f).is_file()
    }
    pipe._model_index_extra = {k: v for k, v in index.items() if k not in COMPONENTS and not k.startswith("_")}
    pipe.sampling_defaults = dict(index.get("omnigen2_sampling", {}))
    pipe.reflection_adapter = load_reflection_adapter(root)
    if dev is not None:
        pipe.to(dev)
    return pipe


def prevalidate(root: Path, index: dict, overrides, dtype, device, allow_pickle=False, check_memory=True) -> None:
    """Everything ``load_pipeline`` can check before allocating a model (see ``omnigen2.checkpoint_check``):
    configs, shard headers and indexes, every expected tensor and its shape, the tokenizer files, the sampling
    defaults and, with ``check_memory``, the memory the models will take at ``dtype``."""
    classes = _component_classes()
    sizes, configs = {}, {}
    for comp in ("transformer", "vae", "mllm"):
        if comp in overrides:
            config = getattr(overrides[comp], "config", {})
            configs[comp] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            continue
        folder = root / comp
        cls = classes[comp][index[comp][1]]
        if allow_pickle and not any(folder.glob("*.safetensors")):  # pickle headers cannot be read unpickled
            config = checkpoint_check.check_config(comp, folder / "config.json")
            expected = checkpoint_check.expected_tensors(comp, cls, folder, config)
        else:
            expected = checkpoint_check.check_component(comp, cls, folder)
        configs[comp] = checkpoint_check.read_json(folder / "config.json")
        sizes[comp] = checkpoint_check.model_bytes(expected, dtype)
    if "processor" not in overrides:
        checkpoint_check.check_processor(root / "processor")
    if "omnigen2_sampling" in index:
        multiple = checkpoint_check.size_multiple(configs["vae"], configs["transformer"])
        checkpoint_check.check_sampling(root / "model_index.json", index["omnigen2_sampling"], multiple)
    check_reflection_adapter(root)
    if check_memory and sizes:
        checkpoint_check.check_memory(sizes, dtype, device)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # whatever the tokenizer classes raise for files they cannot use
        files = ", ".join(sorted(f.name for f in folder.iterdir() if f.is_file()))
        raise CheckpointError(
            f"{folder}: the tokenizer could not be loaded from {files} ({type(e).__name__}: {e})"
        ) from e


def _load_component(comp: str, target, folder: Path, dtype, allow_pickle: bool):
    """``target.from_pretrained(folder)``; any error that still escapes it (or a tensor it reports missing) is a
    CheckpointError naming the folder and its weight files, with the original as ``__cause__``."""
    safe = None if allow_pickle else True
    try:
        if comp == "scheduler":
            return target.from_pretrained(folder)
        if comp == "mllm":
            model, info = target.from_pretrained(folder, dtype=dtype, use_safetensors=safe, output_loading_info=True)
        else:
            model, info = target.from_pretrained(
                folder, torch_dtype=dtype, use_safetensors=safe, output_loading_info=True
            )
    except Exception as e:  # noqa: BLE001 - every library error becomes one message naming the files
        files = ", ".join(sorted(f.name for f in folder.iterdir() if f.is_file()))
        raise CheckpointError(f"{folder}: loading the {comp} failed ({type(e).__name__}: {e}); files: {files}") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"{comp}: tensors missing from {folder}: {', '.join(missing[:5])}; they would load as random initialisation"
        )
    return model


REFLECTION_ADAPTER_DIR = "mllm_reflection"  # optional: a LoRA adapter of the MLLM used for judging turns


def load_reflection_adapter(root: Path) -> dict | None:
    """``{"config": peft LoraConfig kwargs, "state_dict": LoRA tensors}`` from ``root/mllm_reflection`` (peft's
    adapter_config.json + adapter_model.safetensors), or None when the checkpoint has none."""
    folder = Path(root) / REFLECTION_ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        return None
    config = check_reflection_adapter(root)
    from .training.lora import check_pairs, read_safetensors

    weights = folder / "adapter_model.safetensors"
    state_dict = read_safetensors(weights)[0]
    check_pairs(state_dict, weights)
    return {"config": config, "state_dict": state_dict}


def check_reflection_adapter(root: Path) -> dict | None:
    """The adapter's config (rank, alpha, target modules) and a readable weights file; returns the config."""
    folder = Path(root) / REFLECTION_ADAPTER_DIR
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return None
    config = checkpoint_check.read_json(config_file)
    checkpoint_check.check_fields(
        config_file,
        config,
        {"r": checkpoint_check.Field("int", 1, 65536), "lora_alpha": checkpoint_check.Field("float")},
    )
    for name in ("r", "target_modules"):
        if name not in config:
            raise CheckpointError(f"{config_file} lacks the field {name!r}")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise CheckpointError(f"{config_file}: field 'target_modules' is {targets!r}; it must be a string or strings")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    checkpoint_check.read_header(weights)
    return config


def save_reflection_adapter(adapter: dict, root: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(root) / REFLECTION_ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter["config"], indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter["state_dict"].items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _own_aligned_memory(module: torch.nn.Module) -> None:
    """Copy misaligned CPU weights into memory of their own. Tensors loaded from safetensors are views into the
    memory-mapped file at whatever offset its header leaves them, and CPU kernels take different vectorised
    paths for differently aligned data: the same weights re-saved or re-sharded would give slightly different
    images. PyTorch allocates CPU tensors 64-byte aligned, so with copies the results depend on the weights only."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type == "cpu" and t.data_ptr() % 64:
                t.data = t.data.clone()


def _atomic_dir(target: Path):
    tmp = target.with_name(target.name + ".tmp-save")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_pipeline(pipe, save_directory, max_shard_size: str = "5GB") -> None:
    """Write the released layout; the directory is replaced only once everything is written. A write that fails
    (a full disk) leaves ``save_directory`` as it was and no temporary folder behind."""
    target = Path(save_directory)
    tmp = _atomic_dir(target)
    try:
        _write_layout(pipe, tmp, max_shard_size)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(
                e.errno, f"could not save the pipeline to {target}: {e.strerror or e}; nothing of it was kept"
            ) from e
        raise
    if target.exists():
        old = target.with_name(target.name + ".old-save")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def _write_layout(pipe, tmp: Path, max_shard_size: str) -> None:
    sched_name = type(pipe.scheduler).__name__
    index = {
        "_class_name": "OmniGen2Pipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "mllm": [RELEASED_MODULES["mllm"], "Qwen2_5_VLForConditionalGeneration"],
        "processor": [RELEASED_MODULES["processor"], "Qwen2_5_VLProcessor"],
        "scheduler": [RELEASED_MODULES["scheduler"].get(sched_name, "diffusers"), sched_name],
        "transformer": [RELEASED_MODULES["transformer"], "OmniGen2Transformer2DModel"],
        "vae": [RELEASED_MODULES["vae"], "AutoencoderKL"],
        **pipe._model_index_extra,
    }
    if pipe.sampling_defaults:
        index["omnigen2_sampling"] = pipe.sampling_defaults
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    pipe.transformer.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
    pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    pipe.mllm.save_pretrained(tmp / "mllm", max_shard_size=max_shard_size)
    pipe.processor.save_pretrained(tmp / "processor")
    if getattr(pipe, "reflection_adapter", None):
        save_reflection_adapter(pipe.reflection_adapter, tmp)
    for name, data in pipe._processor_files.items():
        if not (tmp / "processor" / name).exists():
            (tmp / "processor" / name).write_bytes(data)
