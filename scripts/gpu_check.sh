#!/usr/bin/env bash
# Everything a lent GPU session should measure, in one device call (about 6-8 minutes on an H100):
#   run(command="bash scripts/gpu_check.sh", carry=[".device"], timeout_s=540)
# Prepare once on the development machine (the device reaches no package index; diffusers is not in its image):
#   pip download diffusers==0.42.1 --no-deps -d .device/wheels && cp -r tests/fixtures .device/fixtures
set -uo pipefail
OUT=${OUT:-/tmp/omnigen2_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD/src OMNIGEN2_FIXTURES=$PWD/.device/fixtures
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/device.txt"

echo "== parity on CUDA (fixtures)"; python3 scripts/gpu_parity.py 2>&1 | tee "$OUT/parity.txt" | tail -3

bench() { python3 -m omnigen2.cli bench --preset full --device cuda --dtype bf16 --height 1024 --width 1024 \
            --steps 50 --repeats 2 --warmup 1 --write "$OUT/BENCHMARKS.md" "$@" 2>&1 | tail -6; }
echo "== full size, text-only, 2 branches";             bench --num-images 0 --branches 2
echo "== full size, one input image, 3 branches";       bench --num-images 1 --branches 3
echo "== the same, one call per branch (the original's schedule)"; bench --num-images 1 --branches 3 --sequential-guidance
echo "== full size, one input image, int8 / fp8";       bench --num-images 1 --branches 3 --quantize fp8 --repeats 1
echo "== offload (model)";                               bench --num-images 0 --branches 2 --offload model --repeats 1 --steps 10
