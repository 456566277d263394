"""``omnigen2 export``: a training checkpoint -> a pipeline directory in the released layout."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..loading import parse_dtype
from ..models import OmniGen2Transformer2DModel
from ..pipelines import OmniGen2Pipeline
from .checkpoint import checkpoint_dirs, load_checkpoint
from .lora import LORA_FILE, save_lora


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = checkpoint_dirs(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} is neither a checkpoint nor a run directory with checkpoints")
    return found[-1]


def export(
    checkpoint: str | Path,
    output: str | Path,
    weights: str = "ema",
    merge_lora: bool = False,
    dtype: str | None = None,
    sampling_defaults: dict | None = None,
) -> Path:
    """Write a loadable pipeline. ``weights``: "ema" (default when the run kept an EMA) or "raw"."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ck_dir = find_checkpoint(checkpoint)
    ck = load_checkpoint(ck_dir)
    state = ck["state"]
    cfg = state["config"]
    sd = ck["ema"] if weights == "ema" and "ema" in ck else ck["trainable"]
    if weights == "ema" and "ema" not in ck:
        print(f"note: {ck_dir} has no EMA (train.ema_decay was 0); exporting the raw weights")
    # EMA tensors carry the parameter names of the training module (peft's ".default." adapter infix).
    sd = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in sd.items()}
    rows = sd.pop("mllm.token_rows", None)

    pipe = OmniGen2Pipeline.from_pretrained(cfg["model"]["pretrained"], torch_dtype=parse_dtype(cfg["model"]["dtype"]))
    spec = cfg["model"].get("transformer")
    if spec is not None:
        t = (
            OmniGen2Transformer2DModel.from_preset(spec)
            if isinstance(spec, str)
            else OmniGen2Transformer2DModel(**spec)
        )
        pipe.transformer = t.to(pipe.mllm.dtype)
        pipe.register_modules(transformer=pipe.transformer)
    out = Path(output)
    if state["mode"] == "full":
        pipe.transformer.load_state_dict({k: v.to(pipe.transformer.dtype) for k, v in sd.items()})
    else:
        lora = state["lora"]
        from peft import set_peft_model_state_dict

        from .lora import peft_config

        pipe.transformer.add_adapter(
            peft_config(lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["target_modules"])
        )
        set_peft_model_state_dict(pipe.transformer, sd, adapter_name="default")
        if merge_lora:
            pipe.transformer.fuse_lora(lora_scale=1.0)
            pipe.transformer.unload_lora()
        else:
            pipe.transformer.unload_lora()  # the base weights go to transformer/, the adapter beside them
    if rows is not None:  # trained embedding rows of new tokens (e.g. <|img|>)
        with torch.no_grad():
            weight = pipe.mllm.get_input_embeddings().weight
            weight[torch.tensor(state["token_ids"])] = rows.to(weight)
    if dtype is not None:
        pipe.to(parse_dtype(dtype))
    if sampling_defaults:
        pipe.sampling_defaults = {**pipe.sampling_defaults, **sampling_defaults}
    pipe.save_pretrained(out)
    if state["mode"] == "lora" and not merge_lora:
        save_lora(out, {f"transformer.{k}": v for k, v in sd.items()}, lora)
        print(f"wrote the LoRA adapter to {out / LORA_FILE} (load it with pipe.load_lora_weights)")
    return out
