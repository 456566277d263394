"""Assemble a miniature pipeline directory in the released layout from its trained parts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import OmniGen2Transformer2DModel
from ..pipelines import OmniGen2Pipeline
from ..schedulers import FlowMatchEulerDiscreteScheduler
from .mini import image_processor_config, transformer_config


def assemble(
    out_dir: str | Path,
    tokenizer,
    mllm,
    vae,
    transformer: OmniGen2Transformer2DModel | None = None,
    sampling_defaults: dict | None = None,
    seed: int = 0,
    shift_factor: float | None = 3.0,
) -> Path:
    """Write ``out_dir`` (model_index.json, transformer/, vae/, scheduler/, mllm/, processor/).

    Without ``transformer`` a fresh one (the miniature's config, sized to the MLLM) is initialised from
    ``seed``: the base the diffusion training starts from."""
    if transformer is None:
        torch.manual_seed(seed)
        transformer = OmniGen2Transformer2DModel(
            **transformer_config(text_feat_dim=mllm.config.text_config.hidden_size)
        )
    pipe = OmniGen2Pipeline(
        transformer=transformer,
        vae=vae,
        # A fixed warp towards noise, as the recipe trains: at 64 image tokens the original's dynamic shift
        # would move the steps to the clean end, away from the noisy steps where the prompt decides the image.
        scheduler=FlowMatchEulerDiscreteScheduler(dynamic_time_shift=False, time_shift_factor=shift_factor),
        mllm=mllm,
        processor=tokenizer,
    )
    pipe._processor_files = {"preprocessor_config.json": json.dumps(image_processor_config(), indent=2).encode()}
    pipe.sampling_defaults = dict(sampling_defaults or {})
    pipe._model_index_extra["omnigen2_domain"] = "shapes"  # the pipeline warns on prompts outside the grammar
    pipe._model_index_extra["omnigen2_reflection"] = "shapes"  # the judging sentences its MLLM is taught
    pipe.save_pretrained(out_dir)
    return Path(out_dir)
