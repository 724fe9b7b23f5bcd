#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the CUDA tests of the held-out paths (offload,
# checkpoints, interrupts, backups, sums, device routing), then FFT and paper routing under
# torch.compile(mode="max-autotune") (GEMMs autotuned, fused epilogues among the candidates).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_heldout_offload.py tests/test_checkpoint.py \
  tests/test_heldout_interrupt.py tests/test_shrink_backup.py tests/test_probe_sums.py tests/test_device_routing.py \
  2>&1 | grep -E "^E |passed|failed" | head -20 | tee $OUT/tests.txt
timeout 420 python benches/loop_bench.py --batches 4x512 --steps 12 --modes autotune --setups fft,molf-param \
  --out $OUT/autotune.json > $OUT/autotune.log 2>&1
grep -E '^\||graphs' $OUT/autotune.log | tail -6
