#!/usr/bin/env bash
# The Shapes transformer stage on a lent GPU, in one device call: the tokenizer, VAE, MLLM and answering adapter
# are the bundled model's (recipe --parts builtin:shapes, in the working tree the device receives), so the data and
# the transformer are all that run there:
#   run(command="bash scripts/shapes_gpu.sh", carry=[".device"], timeout_s=580)
# Prepare on the development machine (the device reaches no package index):
#   pip download diffusers==0.42.1 accelerate==1.15.0 peft==0.21.2 --no-deps -d .device/wheels
# The recipe's result (the folder its result.txt names) comes back under $OUT/final (about 20 MB); copy it to
# src/omnigen2/builtin/shapes after checking it with `omnigen2 eval shapes --model <it> --n 300`.
set -uo pipefail
OUT=${OUT:-/tmp/omnigen2_out}
RUN=/tmp/shapes_run
mkdir -p "$OUT" "$RUN"
python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
start=$(date +%s)
python3 -m omnigen2.shapes.recipe --budget gpu --parts builtin:shapes --out "$RUN" 2>&1 | grep -v "it/s\]" | tail -40 | tee "$OUT/recipe.txt"
echo "recipe wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/recipe.txt"
cp "$RUN"/transformer_run/metrics.jsonl "$OUT/" 2>/dev/null
cp -r "$RUN/$(cat "$RUN/result.txt")" "$OUT/final"
