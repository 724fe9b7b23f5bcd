#!/usr/bin/env bash
# One device call (issue #32): a stacked [W; A] layer against today's per layer shape
# (stacked_layer.py), then where the whole step's time goes (breakdown.py) for FFT, PEFT LoRA,
# molf paper routing and held-out routing (param state), with the carried wheel .whl/cur.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=/tmp/cur timeout 90 python research/device/stacked_layer.py --out $OUT/stacked.json > $OUT/stacked.log 2>&1
PYTHONPATH=/tmp/cur timeout ${1:-380} python research/device/breakdown.py --setups ${2:-fft,molf-param,molf-heldout-param,lora} \
  --out $OUT/breakdown.json > $OUT/breakdown.log 2>&1
tail -6 $OUT/stacked.log
tail -6 $OUT/breakdown.log
