#!/usr/bin/env bash
# One device call (issue #35's svd form, issue #32's bench), wheel .whl/cur: MoLF-E's whole step
# with λ folded into B (ea6389e) beside the B·A form and PEFT LoRA r144, eager, 4x512.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python benches/loop_bench.py --batches 4x512 --steps 12 --setups lora144,molf-e,molf-e-svd \
  --out $OUT/svd-fold.json > $OUT/svd-fold.log 2>&1
tail -5 $OUT/svd-fold.log
