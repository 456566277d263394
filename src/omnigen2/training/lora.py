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
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def read_lora(source) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load a LoRA file (or a folder holding pytorch_lora_weights.safetensors, or a state dict) into peft keys
    without prefix; returns (state_dict, LoraConfig kwargs or None)."""
    metadata = None
    if isinstance(source, dict):
        raw = dict(source)
    else:
        p = Path(source)
        if p.is_dir():
            p = p / LORA_FILE
        if not p.is_file():
            raise FileNotFoundError(f"LoRA weights {str(p)!r} not found")
        if p.suffix != ".safetensors":
            raise ValueError(f"LoRA weights must be .safetensors (got {p.name}); pickle files are not loaded")
        with safe_open(str(p), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            file_meta = f.metadata() or {}
        if METADATA_KEY in file_meta:
            meta = json.loads(file_meta[METADATA_KEY])
            metadata = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")} or None
    sd, alphas = {}, {}
    for key, value in raw.items():
        k = key
        for prefix in PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        k = k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(value)
            continue
        if ".lora_A." not in k and ".lora_B." not in k:
            raise ValueError(f"unexpected key {key!r} in LoRA weights (expected lora_A/lora_B or lora_down/lora_up)")
        if not k.endswith(".weight"):
            k = k + ".weight" if k.endswith((".lora_A", ".lora_B")) else k
        sd[k] = value
    if not sd:
        raise ValueError("no LoRA weights found")
    if metadata is None:
        ranks = {k.rsplit(".lora_A.", 1)[0]: v.shape[0] for k, v in sd.items() if ".lora_A." in k}
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
    return sd, metadata
