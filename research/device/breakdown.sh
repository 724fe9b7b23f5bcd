#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: a stacked [W; A] layer against today's per layer
# shape (stacked_layer.py); where the whole step's time goes (breakdown.py) for FFT, molf paper
# routing and held-out routing (param state); FFT and molf under torch.compile's CUDA graphs.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
export PYTHONPATH=/tmp/cur
timeout 80 python research/device/stacked_layer.py --out $OUT/stacked.json > $OUT/stacked.log 2>&1
timeout 240 python research/device/breakdown.py --setups fft,molf-param,molf-heldout-param \
  --out $OUT/breakdown.json > $OUT/breakdown.log 2>&1
timeout 150 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs --setups fft,molf-param \
  --out $OUT/cudagraphs.json > $OUT/cudagraphs.log 2>&1
tail -6 $OUT/stacked.log; tail -5 $OUT/breakdown.log; tail -4 $OUT/cudagraphs.log
