"""Training checkpoints: atomic, every N steps, the last K kept, resumable to the same loss curve.

``OUTPUT/checkpoints/step-0000100/`` holds::

    trainable.safetensors   the trained weights (full transformer, or the LoRA adapter in peft keys)
    ema.safetensors         the EMA of the trained weights (when EMA is on)
    optimizer.pt            optimizer + LR-schedule state (tensors and numbers; loaded with weights_only)
    state.json              step, RNG state, config

A checkpoint is written into ``.tmp-step-N`` and renamed when complete, so ``latest`` only ever sees whole
ones; a failed write (a full disk) removes the temporary and raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
RESUME_MODES = ("latest", "auto")  # or a checkpoint directory


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[5:]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from. ``None``: a new run. ``"latest"``: the newest checkpoint of the run, an
    error when there is none (a typo in output.dir must not silently start from step 0). ``"auto"``: the newest
    one, or a new run when there is none (scripted restarts). Else the path of a checkpoint directory."""
    if resume is None:
        return None
    if not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be 'latest', 'auto', a checkpoint directory or None, got {resume!r}")
    if resume in RESUME_MODES:
        found = checkpoint_dirs(output_dir)
        if found or resume == "auto":
            return found[-1] if found else None
        raise CheckpointError(
            f"--resume latest: no checkpoint in {Path(output_dir) / CKPT_DIR}; to start a new run leave out --resume "
            "(Python: resume=None), or use --resume auto (resume='auto') to resume when there is a checkpoint and "
            "start a new run otherwise"
        )
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise CheckpointError(f"--resume {str(resume)!r} is not a checkpoint directory (no state.json)")
    return p


def _write(tmp: Path, trainable: dict, ema: dict | None, optim_state: dict, state: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))  # last: marks the checkpoint whole


def save_checkpoint(
    output_dir, step: int, trainable: dict, ema: dict | None, optim_state: dict, state: dict, keep_last: int
) -> Path:
    root = Path(output_dir) / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a process killed while writing
            shutil.rmtree(stale)
        tmp.mkdir()
        _write(tmp, trainable, ema, optim_state, state)
        if final.exists():  # the same step saved again (a resumed run): swap, never a moment without one
            old = root / f".old-step-{step:07d}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)  # atomic on one filesystem: a checkpoint is complete or absent
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a failed write as RuntimeError, safetensors as SafetensorError
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):
            previous = [p.name for p in checkpoint_dirs(output_dir) if p != final]
            raise CheckpointError(
                f"could not write checkpoint {final}: {e}; nothing of it was kept (the latest checkpoint is "
                f"{previous[-1] if previous else 'none'}); free disk space and resume with --resume latest"
            ) from e
        raise
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)  # a leftover costs space only: latest is already written
    return final


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; the checkpoint is corrupt or incomplete: resume from another one")


def _typed(path: Path, state: dict, key: str, ok: bool, want: str) -> None:
    if not ok:
        raise _fail(path, f"{key!r} must be {want}, got {state[key]!r:.80}")


def read_state(ck: Path) -> dict:
    """state.json of a checkpoint, checked: a JSON object with the keys and types the trainer writes."""
    path = Path(ck) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"not readable JSON ({e})") from e
    if not isinstance(state, dict):
        raise _fail(path, f"must hold a JSON object, got {type(state).__name__}")
    missing = [k for k in ("step", "config", "mode", "token_ids", "lora") if k not in state]
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    step = state["step"]
    _typed(path, state, "step", isinstance(step, int) and not isinstance(step, bool) and step >= 0, "an integer >= 0")
    if Path(ck).name.startswith("step-") and Path(ck).name[5:].isdigit() and int(Path(ck).name[5:]) != step:
        raise _fail(path, f"'step' is {step} but the directory is {Path(ck).name}")
    _typed(path, state, "mode", state["mode"] in ("full", "lora"), "'full' or 'lora'")
    config = state["config"]
    model = config.get("model") if isinstance(config, dict) else None
    ok = isinstance(model, dict) and isinstance(model.get("pretrained"), str) and isinstance(model.get("dtype"), str)
    _typed(path, state, "config", ok, "the run's config (a mapping with model.pretrained and model.dtype)")
    ids = state["token_ids"]
    ok = ids is None or isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    _typed(path, state, "token_ids", ok, "null or a list of token ids")
    lora, want = (
        state["lora"],
        {"r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "target_modules": list},
    )
    ok = isinstance(lora, dict) and all(isinstance(lora.get(k), t) for k, t in want.items())
    _typed(path, state, "lora", ok if state["mode"] == "lora" else lora is None or ok, f"a mapping with {list(want)}")
    return state


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise _fail(path, f"not a readable safetensors file ({e})") from e


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    state = read_state(path)
    optim_path = path / "optimizer.pt"
    try:
        optim = torch.load(optim_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise _fail(optim_path, f"not a readable optimizer state ({type(e).__name__}: {str(e)[:200]})") from e
    missing = [k for k in ("optimizer", "scheduler", "rng_cpu") if not isinstance(optim, dict) or k not in optim]
    if missing:
        raise _fail(optim_path, f"missing {missing}")
    out = {"trainable": _tensors(path / "trainable.safetensors"), "optim": optim, "state": state}
    if (path / "ema.safetensors").is_file():
        out["ema"] = _tensors(path / "ema.safetensors")
    return out


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` past ``step`` (logged after the checkpoint a run resumes from, which
    it logs again) and any line cut short by a crash; rewritten through a rename. Returns how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            s = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            s = None
        if isinstance(s, int) and s <= step:
            keep.append(line + b"\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(b"".join(keep))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("%s: dropped %d line(s) past the resumed step %d", path, dropped, step)
    return dropped
