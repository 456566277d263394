"""Typed training configuration, read from YAML with ``--set key.sub=value`` overrides.

Every field is documented in docs/TRAINING.md; unknown keys are errors (a typo must not silently train
with a default).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..images import MAX_IMAGE_PIXELS
from .data import DataConfig

# Bounds on sizes that would otherwise ask for absurd memory (a typo's extra zeros): a side of 32768 pixels is
# 2048 tokens of 16 pixels, beyond every preset's RoPE table (axes_lens); 32768 text tokens likewise.
MAX_SIDE_LENGTH = 32768
MAX_TOKEN_LEN = 32768


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
        """Ranges and choices; the types are checked when the config is built (``_coerce``)."""
        t, d, lo, o = self.train, self.data, self.lora, self.output
        pixels = d.max_input_pixels if isinstance(d.max_input_pixels, list) else [d.max_input_pixels]
        checks = [
            (t.mode in ("full", "lora"), f"train.mode must be 'full' or 'lora', got {t.mode!r}"),
            (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
            (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
            (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
            (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
            (all(0 <= b < 1 for b in t.betas), f"train.betas must be two numbers in [0, 1), got {list(t.betas)}"),
            (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
            (t.eps > 0, f"train.eps must be > 0, got {t.eps}"),
            (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
            (t.schedule in ("constant", "cosine"), f"train.schedule must be constant or cosine, got {t.schedule!r}"),
            (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
            (t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 disables clipping), got {t.max_grad_norm}"),
            (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
            (t.mixed_precision in ("auto", "no", "bf16", "fp16"), f"bad train.mixed_precision {t.mixed_precision!r}"),
            (lo.rank >= 1, f"lora.rank must be >= 1, got {lo.rank}"),
            (lo.alpha > 0, f"lora.alpha must be > 0, got {lo.alpha}"),
            (0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}"),
            (self.objective.shift_factor > 0, f"objective.shift_factor must be > 0, got {self.objective.shift_factor}"),
            (bool(pixels), "data.max_input_pixels must be a number or a non-empty list"),
            *[(1 <= n <= MAX_IMAGE_PIXELS, _pixels_msg("data.max_input_pixels", n)) for n in pixels],
            (1 <= d.max_output_pixels <= MAX_IMAGE_PIXELS, _pixels_msg("data.max_output_pixels", d.max_output_pixels)),
            (1 <= d.size_multiple <= 256, f"data.size_multiple must be in [1, 256], got {d.size_multiple}"),
            (
                d.max_side_length is None or d.size_multiple <= d.max_side_length <= MAX_SIDE_LENGTH,
                f"data.max_side_length must be null or in [data.size_multiple, {MAX_SIDE_LENGTH}], "
                f"got {d.max_side_length}",
            ),
            (
                1 <= d.max_token_len <= MAX_TOKEN_LEN,
                f"data.max_token_len must be in [1, {MAX_TOKEN_LEN}], got {d.max_token_len}",
            ),
            *[
                (0 <= getattr(d, k) <= 1, f"data.{k} must be in [0, 1], got {getattr(d, k)}")
                for k in ("prompt_dropout", "ref_image_dropout", "caption_prefix_drop", "generation_prompt_prob")
            ],
            (o.save_every >= 1, f"output.save_every must be >= 1, got {o.save_every}"),
            (o.keep_last >= 1, f"output.keep_last must be >= 1, got {o.keep_last}"),
            (o.log_every >= 1, f"output.log_every must be >= 1, got {o.log_every}"),
            (bool(o.dir), "output.dir must not be empty"),
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


def _pixels_msg(name: str, n: int) -> str:
    return (
        f"{name} must be in [1, {MAX_IMAGE_PIXELS}] (images above {MAX_IMAGE_PIXELS} pixels are refused when "
        f"loaded, so a larger budget is never used), got {n}"
    )


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(where + '.' + k if where else k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in values.items():
        sub, name = hints[k], f"{where}.{k}" if where else k
        kwargs[k] = _build(sub, v, name) if dataclasses.is_dataclass(sub) else _coerce(v, sub, name)
    return cls(**kwargs)


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    return (
        names.get(hint) or names.get(get_origin(hint)) or ("a list" if get_origin(hint) in (list, tuple) else str(hint))
    )


def _coerce(value, hint, where: str):
    """The value for a field of type ``hint``, or a ValueError naming the field and the value. YAML reads 1e-4
    (no dot) as a string, so a float field takes a numeric string; nothing else is converted, and a float must
    be finite (NaN compares false with every bound ``validate`` checks)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        for alt in alts:
            try:
                return _coerce(value, alt, where)
            except ValueError as e:
                if str(e).startswith(f"{where}["):  # the right container with a wrong element: say which
                    raise
        kinds = [_describe(a) for a in alts] + (["null"] if type(None) in args else [])
        raise ValueError(f"{where} must be {' or '.join(kinds)}, got {value!r}")
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    if hint is dict and not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set value {text!r} is not valid YAML ({' '.join(str(e).split())})") from None


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
    if path is None:
        return config_from_dict({}, overrides)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a training config must be a mapping of sections, got {type(raw).__name__}")
    # Data paths (and a local model path) in the config are relative to the config file.
    model = raw.get("model", {})
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and model["pretrained"]:
        local = p.parent / model["pretrained"]
        if not Path(model["pretrained"]).is_absolute() and local.exists():
            model["pretrained"] = str(local.resolve())
    data = raw.get("data", {})
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        if not Path(data["path"]).is_absolute():
            data["path"] = str((p.parent / data["path"]).resolve())
    try:
        return config_from_dict(raw, overrides)
    except (ValueError, TypeError) as e:  # the field is named; say in which file (or --set) it was given
        raise type(e)(f"{p}: {e}") from e


def config_from_dict(raw: dict, overrides: list[str] | None = None) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"a training config must be a mapping of sections, got {type(raw).__name__}")
    cfg = _build(TrainConfig, apply_overrides(copy.deepcopy(raw), overrides or []), "")
    cfg.validate()
    return cfg
