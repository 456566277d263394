"""Official-tiny fixtures on CUDA: fp32 (TF32 off) must meet the CPU bar; bf16 error is reported.

OMNIGEN2_FIXTURES=.device/fixtures PYTHONPATH=src python3 scripts/gpu_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ is a package

from tests.conftest import fixtures_root  # noqa: E402
from tests.pipelines.test_parity import CASES, run_case  # noqa: E402

from omnigen2 import OmniGen2Pipeline  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # TF32 matmuls / convolutions would add ~1e-3 errors
torch.backends.cudnn.allow_tf32 = False
tiny = fixtures_root() / "official-tiny"
worst = {}
for dtype in ("fp32", "bf16"):
    pipe = OmniGen2Pipeline.from_pretrained(tiny / "checkpoint", torch_dtype=dtype, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    for case in CASES:
        out, expected = run_case(pipe, case, tiny / "cases")
        err = (out.images[0].float().cpu() - expected).abs().max().item()
        worst[dtype] = max(worst.get(dtype, 0.0), err)
        print(f"{dtype} {case['name']:24s} {err:.2e}")
print(f"worst fp32 {worst['fp32']:.2e} (bar 2e-4), worst bf16 {worst['bf16']:.2e}")
sys.exit(0 if worst["fp32"] <= 2e-4 else 1)
