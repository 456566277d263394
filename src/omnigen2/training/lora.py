"""LoRA adapters for the OmniGen2 transformer (through peft), in the original's file format.

File format (what the original's training script saves and its pipeline loads): a safetensors file
``pytorch_lora_weights.safetensors`` with peft keys prefixed ``transformer.``, e.g.
``transformer.layers.0.attn.to_q.lora_A.weight`` (rank x in) and ``...lora_B.weight`` (out x rank).
We also store the adapter config (rank, alpha, targets) in the file's metadata under
``lora_adapter_metadata`` as diffusers does; without it, alpha = rank (the original's convention).

Also accepted on load: ComfyUI-style files, keys prefixed ``diffusion_model.``, with ``lora_A/lora_B`` or
``lora_down/lora_up`` names and optional per-module ``.alpha`` scalars.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint_check import open_safetensors
from ..errors import CheckpointError

LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "model.")


def peft_config(rank: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), init_lora_weights=True
    )


def config_kwargs(cfg) -> dict:
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
    }


def lora_state_dict(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with the original's ``transformer.`` prefix."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}


def save_lora(directory: str | os.PathLike, state_dict: dict, kwargs: dict) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in kwargs.items()})}
    save_file(state_dict, str(path / LORA_FILE), metadata=meta)
    return path / LORA_FILE


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; a file safetensors cannot read (not safetensors, truncated, a
    bad header) is a CheckpointError naming it."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _module_of(key: str) -> tuple[str, str] | None:
    """("layers.0.attn.to_q", "A") for "layers.0.attn.to_q.lora_A.weight"; None for other keys."""
    for side in ("A", "B"):
        if f".lora_{side}." in key:
            return key.split(f".lora_{side}.", 1)[0], side
    return None


def lora_pairs(state_dict: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {"A": lora_A weight, "B": lora_B weight} (either may be absent)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        found = _module_of(key)
        if found:
            pairs.setdefault(found[0], {})[found[1]] = value
    return pairs


def _listed(names, most: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" (and {len(names) - most} more)" if len(names) > most else "")


def check_pairs(state_dict: dict, source) -> None:
    """Every lora_A with its lora_B and the same rank, every value a finite tensor. A half pair would load as a
    no-op, a non-finite value would poison every image."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"LoRA weights {source}: {key!r} is a {type(value).__name__}, not a tensor")
        if _module_of(key) and not value.is_floating_point():
            raise CheckpointError(f"LoRA weights {source}: tensor {key!r} has dtype {value.dtype}, not a float")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"LoRA weights {source}: tensor {key!r} holds non-finite values (NaN or inf)")
    pairs = lora_pairs(state_dict)
    for side, other in (("A", "B"), ("B", "A")):
        lone = [f"{m}.lora_{side}" for m, p in pairs.items() if other not in p]
        if lone:
            raise CheckpointError(f"LoRA weights {source}: lora_{side} without its lora_{other}: {_listed(lone)}")
    for module, p in pairs.items():
        a, b = p["A"], p["B"]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"LoRA weights {source}: {module} has lora_A of shape {list(a.shape)} and lora_B of shape "
                f"{list(b.shape)}; their ranks (lora_A rows, lora_B columns) must match"
            )


def check_lora_targets(transformer, state_dict: dict, source="state dict") -> None:
    """Every LoRA pair names a linear layer of ``transformer`` with matching in/out features: keys that match no
    module would load as a no-op (diffusers only warns)."""
    modules = dict(transformer.named_modules())
    pairs = lora_pairs(state_dict)
    unmatched = [m for m in pairs if m not in modules]
    if unmatched:
        raise CheckpointError(
            f"LoRA weights {source}: {len(unmatched)} of {len(pairs)} adapted modules are not in the transformer: "
            f"{_listed(unmatched)}"
        )
    for module, p in pairs.items():
        layer = modules[module]
        size_in, size_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if size_in is None or size_out is None:
            raise CheckpointError(f"LoRA weights {source}: {module} is a {type(layer).__name__}, not a linear layer")
        if p["A"].shape[1] != size_in or p["B"].shape[0] != size_out:
            raise CheckpointError(
                f"LoRA weights {source}: {module} maps {size_in} -> {size_out} features, but its lora_A has shape "
                f"{list(p['A'].shape)} and lora_B {list(p['B'].shape)}"
            )


def _file_metadata(path: Path, file_meta: dict) -> dict | None:
    if METADATA_KEY not in file_meta:
        return None
    try:
        meta = json.loads(file_meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} must be a JSON object, got {meta!r}")
    return {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")} or None


def _check_metadata(metadata: dict, ranks: dict[str, int], source) -> None:
    """The stored config must describe the tensors: a rank other than the tensors' fails deep in peft."""
    rank = metadata.get("r")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise CheckpointError(f"LoRA weights {source}: metadata 'r' is {rank!r}; it must be an integer >= 1")
    alpha = metadata.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"LoRA weights {source}: metadata 'lora_alpha' is {alpha!r}; it must be a finite number")
    if not metadata.get("rank_pattern"):
        other = {m: r for m, r in ranks.items() if r != rank}
        if other:
            listed = _listed(f"{m} (rank {r})" for m, r in other.items())
            raise CheckpointError(f"LoRA weights {source}: metadata says rank {rank} but {listed}")


def read_lora(source, transformer=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load a LoRA file (or a folder holding pytorch_lora_weights.safetensors, or a state dict) into peft keys
    without prefix; returns (state_dict, LoraConfig kwargs or None). Half pairs, rank mismatches, non-finite
    values and unreadable files are refused; with ``transformer``, so are keys that match none of its modules."""
    metadata = None
    if isinstance(source, dict):
        raw, where = dict(source), "state dict"
    else:
        p = Path(source)
        if p.is_dir():
            p = p / LORA_FILE
        if not p.is_file():
            raise FileNotFoundError(f"LoRA weights {str(p)!r} not found")
        if p.suffix != ".safetensors":
            raise CheckpointError(f"LoRA weights must be .safetensors (got {p.name}); pickle files are not loaded")
        raw, file_meta = read_safetensors(p)
        metadata, where = _file_metadata(p, file_meta), str(p)
    sd, alphas = {}, {}
    for key, value in raw.items():
        k = key
        for prefix in PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        k = k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = _alpha(value, key, where)
            continue
        if ".lora_A." not in k and ".lora_B." not in k:
            raise CheckpointError(
                f"LoRA weights {where}: unexpected key {key!r} (expected lora_A/lora_B or lora_down/lora_up)"
            )
        if not k.endswith(".weight"):
            k = k + ".weight" if k.endswith((".lora_A", ".lora_B")) else k
        sd[k] = value
    if not sd:
        raise CheckpointError(f"LoRA weights {where}: no LoRA weights found")
    check_pairs(sd, where)
    ranks = {k.rsplit(".lora_A.", 1)[0]: v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    if metadata is not None:
        _check_metadata(metadata, ranks, where)
    if transformer is not None:
        check_lora_targets(transformer, sd, where)
    if metadata is None:
        metadata = _inferred_config(ranks, alphas)
    return sd, metadata


def _alpha(value, key: str, where) -> float:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise CheckpointError(f"LoRA weights {where}: {key!r} must be a single number")
    alpha = float(value)
    if not math.isfinite(alpha):
        raise CheckpointError(f"LoRA weights {where}: {key!r} is {alpha}, not a finite number")
    return alpha


def _inferred_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """The LoraConfig kwargs of a file without stored config: alpha = rank unless per-module alphas say else."""
    rank = max(ranks.values())
    targets = sorted({m.split(".")[-1] if not m.endswith(".0") else ".".join(m.split(".")[-2:]) for m in ranks})
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    if set(ranks.values()) != {rank}:
        metadata["rank_pattern"] = {m: r for m, r in ranks.items() if r != rank}
    if alphas:
        values = set(alphas.values())
        metadata["lora_alpha"] = next(iter(values)) if len(values) == 1 else rank
        if len(values) > 1:
            metadata["alpha_pattern"] = alphas
    return metadata
