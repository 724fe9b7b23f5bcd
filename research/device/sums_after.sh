#!/usr/bin/env bash
# One device call (issues #32, #35), wheel .whl/cur: the probe's sums with their chunk tables
# reused between probes (`_probe_sums._Plan`) — the CUDA tests, the eager profile, the probe
# under CUDA graphs beside FFT — then MoLF-E's svd form under CUDA graphs.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_probe_sums.py 2>&1 | tail -1
(cd research/device && timeout 120 python sums_profile.py --probes 3 --mode eager > $OUT/profile-eager.txt 2>&1)
grep "wall ms" $OUT/profile-eager.txt
timeout 330 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups fft,molf-heldout-param --heldout-steps 50 --out $OUT/graphs.json > $OUT/graphs.log 2>&1
tail -5 $OUT/graphs.log
timeout 220 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups molf-e-svd,molf-e --out $OUT/svd-graphs.json > $OUT/svd-graphs.log 2>&1
tail -4 $OUT/svd-graphs.log
