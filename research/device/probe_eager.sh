#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the spectral trial's CUDA tests, the whole step with
# held-out routing (param state) beside FFT and paper routing, eager 4x512, and
# which CUDA graph tree path each call of a held-out run takes under reduce-overhead.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_spectral_gemm.py tests/test_heldout.py tests/test_routed_linear.py \
  -k "spectral or cuda" 2>&1 | tail -1
timeout 170 python benches/loop_bench.py --batches 4x512 --steps 12 --setups fft,molf-param,molf-heldout-param \
  --heldout-steps 50 --out $OUT/eager.json > $OUT/eager.log 2>&1
tail -9 $OUT/eager.log
timeout 150 python research/device/graph_paths.py --steps 24 --out $OUT/paths.json > $OUT/paths.log 2>&1
grep '^{' $OUT/paths.log | tail -12
grep -i "skipping cudagraph\|unable to hit\|re-record\|recompil" $OUT/paths.log | sort | uniq -c | head
