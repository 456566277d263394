"""Official-tiny fixtures on CUDA: fp32 (TF32 off) must meet the CPU bar; bf16 error is reported.

OMNIGEN2_FIXTURES=.device/fixtures python3 scripts/gpu_parity.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from omnigen2 import OmniGen2Pipeline

root = Path(os.environ.get("OMNIGEN2_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
tiny = root / "official-tiny"
torch.backends.cuda.matmul.allow_tf32 = False  # TF32 matmuls / convolutions would add ~1e-3 errors
torch.backends.cudnn.allow_tf32 = False
cases = json.loads((tiny / "cases" / "cases.json").read_text())
worst = {}
for dtype in ("fp32", "bf16"):
    pipe = OmniGen2Pipeline.from_pretrained(tiny / "checkpoint", torch_dtype=dtype, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    for c in cases:
        data = load_file(tiny / "cases" / f"{c['name']}.safetensors")
        kw = {}
        if c.get("height") is not None:
            kw.update(height=c["height"], width=c["width"])
        if "scheduler" in c:
            kw["scheduler"] = "dpmsolver++"
        if "teacache" in c:
            kw["teacache"] = c["teacache"]["rel_l1_thresh"]
        if "taylorseer" in c:
            kw["taylorseer"] = True
        images = [Image.open(tiny / "cases" / n).convert("RGB") for n in c["images"]] or None
        out = pipe(
            prompt=c["prompt"],
            negative_prompt=c["negative_prompt"],
            input_images=images,
            num_inference_steps=c["steps"],
            text_guidance_scale=c["tgs"],
            image_guidance_scale=c["igs"],
            cfg_range=tuple(c["cfg_range"]),
            max_sequence_length=1024,
            max_pixels=96 * 96,
            max_input_image_side_length=96,
            latents=data["initial_latents"],
            output_type="pt",
            **kw,
        )
        err = (out.images[0].cpu() - data["image"]).abs().max().item()
        worst[dtype] = max(worst.get(dtype, 0.0), err)
        print(f"{dtype} {c['name']:24s} {err:.2e}")
print(f"worst fp32 {worst['fp32']:.2e} (bar 2e-4), worst bf16 {worst['bf16']:.2e}")
sys.exit(0 if worst["fp32"] <= 2e-4 else 1)
