#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: FFT and held-out routing (param state, and with
# offload) under torch.compile's CUDA graphs (reduce-overhead), 4x512, 50 steps with 5 probes.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_heldout.py -k spectral_trial_on_cuda 2>&1 | tail -2
timeout 480 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups fft,molf-heldout-param,molf-heldout-offload --heldout-steps 50 --out $OUT/graphs.json > $OUT/graphs.log 2>&1
tail -14 $OUT/graphs.log
