"""Training checkpoints: atomic, every N steps, the last K kept, resumable to the same loss curve.

``OUTPUT/checkpoints/step-0000100/`` holds::

    trainable.safetensors   the trained weights (full transformer, or the LoRA adapter in peft keys)
    ema.safetensors         the EMA of the trained weights (when EMA is on)
    optimizer.pt            optimizer + LR-schedule state (tensors and numbers; loaded with weights_only)
    state.json              step, RNG state, config
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise ValueError(f"--resume {resume!r} is not a checkpoint directory (no state.json)")
    return p


def save_checkpoint(
    output_dir, step: int, trainable: dict, ema: dict | None, optim_state: dict, state: dict, keep_last: int
) -> Path:
    root = Path(output_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic on one filesystem: a checkpoint is complete or absent
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> dict:
    out = {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optim": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }
    if (path / "ema.safetensors").is_file():
        out["ema"] = load_file(str(path / "ema.safetensors"))
    return out
