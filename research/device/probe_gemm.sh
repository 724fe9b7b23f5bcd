#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the CUDA tests of the held-out paths (the spectral
# trial's Newton-Schulz products among them), its r x r work against cuSOLVER's eigen-
# decompositions, and the whole step with held-out routing (param state; with offload), eager, 4x512.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 170 python -m pytest -q -p no:cacheprovider tests/test_heldout_offload.py tests/test_checkpoint.py \
  tests/test_heldout_interrupt.py tests/test_shrink_backup.py tests/test_probe_sums.py tests/test_device_routing.py \
  tests/test_spectral_gemm.py tests/test_heldout.py 2>&1 | grep -E "^E |passed|failed|^FAILED" | head -30
timeout 40 python research/device/eigh_bench.py 2>&1 | tail -5
timeout 330 python benches/loop_bench.py --batches 4x512 --steps 12 \
  --setups fft,molf-heldout-param,molf-heldout-offload --heldout-steps 50 --out $OUT/eager.json > $OUT/eager.log 2>&1
tail -14 $OUT/eager.log
