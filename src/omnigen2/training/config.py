"""Typed training configuration, read from YAML with ``--set key.sub=value`` overrides.

Every field is documented in docs/TRAINING.md; unknown keys are errors (a typo must not silently train
with a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .data import DataConfig


@dataclass
class ModelConfig:
    pretrained: str = ""  # pipeline directory, hub id or builtin:NAME (transformer, vae, mllm, processor)
    transformer: dict | str | None = None  # train a fresh transformer: a preset name or config fields
    dtype: str = "fp32"  # weights of the frozen MLLM and VAE (the trained weights stay fp32)
    attention_backend: str = "auto"


@dataclass
class OptimConfig:
    mode: str = "full"  # "full" or "lora"
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # samples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (gradients are averaged)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables EMA
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "no", "bf16", "fp16"
    seed: int = 0
    train_token_embeddings: list[str] = field(default_factory=list)  # e.g. ["<|img|>"]: MLLM rows to train
    # Train the caption projection through a whitening of its inputs (training/precondition.py): the same
    # function, better-conditioned steps for text directions that the MLLM states barely move along.
    precondition_text: bool = False


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ObjectiveConfig:
    time_sampler: str = "lognorm"  # "lognorm" or "uniform"
    time_shift: str = "v2"  # "v2" (matches inference), "v1" (SD3-style), "fixed" (m = shift_factor) or "none"
    shift_factor: float = 3.0  # m of the "fixed" shift (sample with the scheduler's time_shift_factor = m)
    loss_reduction: str = "element"  # "element" or "sample" (the original)
    vae_sample: bool = False  # sample the VAE posterior of the targets instead of taking its mean


@dataclass
class OutputConfig:
    dir: str = "runs/omnigen2"
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        t = self.train
        checks = [
            (t.mode in ("full", "lora"), f"train.mode must be 'full' or 'lora', got {t.mode!r}"),
            (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
            (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
            (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
            (t.schedule in ("constant", "cosine"), f"train.schedule must be constant or cosine, got {t.schedule!r}"),
            (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
            (t.mixed_precision in ("auto", "no", "bf16", "fp16"), f"bad train.mixed_precision {t.mixed_precision!r}"),
            (self.lora.rank >= 1, f"lora.rank must be >= 1, got {self.lora.rank}"),
            (0 <= self.data.prompt_dropout <= 1, "data.prompt_dropout must be in [0, 1]"),
            (0 <= self.data.ref_image_dropout <= 1, "data.ref_image_dropout must be in [0, 1]"),
            (self.output.save_every >= 1 and self.output.keep_last >= 1, "output.save_every/keep_last must be >= 1"),
            (bool(self.model.pretrained), "model.pretrained is required (the MLLM, VAE and tokenizer come from it)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        from .objective import SHIFTS, TIME_SAMPLERS

        if self.objective.time_shift not in SHIFTS:
            raise ValueError(f"objective.time_shift must be one of {SHIFTS}, got {self.objective.time_shift!r}")
        if self.objective.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"objective.time_sampler must be one of {TIME_SAMPLERS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(where + '.' + k if where else k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in values.items():
        sub = hints[k]
        if dataclasses.is_dataclass(sub):
            kwargs[k] = _build(sub, v, f"{where}.{k}" if where else k)
        elif k == "betas":
            kwargs[k] = tuple(float(x) for x in v)
        else:
            kwargs[k] = _coerce(v, sub, f"{where}.{k}" if where else k)
    return cls(**kwargs)


def _coerce(value, hint, where: str):
    """YAML reads 1e-4 (no dot) as a string: convert by the field's type, and reject what does not fit."""
    if hint is float or hint == (float | None):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value) if value is not None else None
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from e
        # Data paths (and a local model path) in the config are relative to the config file.
        model = raw.get("model", {})
        if isinstance(model, dict) and isinstance(model.get("pretrained"), str):
            local = p.parent / model["pretrained"]
            if not Path(model["pretrained"]).is_absolute() and local.exists():
                model["pretrained"] = str(local.resolve())
        data = raw.get("data", {})
        if isinstance(data, dict) and data.get("path") and not Path(data["path"]).is_absolute():
            data["path"] = str((p.parent / data["path"]).resolve())
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(TrainConfig, raw, "")
    cfg.validate()
    return cfg


def config_from_dict(raw: dict, overrides: list[str] | None = None) -> TrainConfig:
    cfg = _build(TrainConfig, apply_overrides(dict(raw), overrides or []), "")
    cfg.validate()
    return cfg
