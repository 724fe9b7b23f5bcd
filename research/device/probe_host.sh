#!/usr/bin/env bash
# One device call (issues #32, #35), wheel .whl/cur: where the held-out probe's host time goes
# (cProfile of measure and _sums, under CUDA graphs and eager), then MoLF-E's svd form on the
# whole-step bench (svd_step.sh).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd research/device
timeout 200 python sums_profile.py --probes 2 --mode cudagraphs > $OUT/profile-cudagraphs.txt 2>&1
grep "wall ms" $OUT/profile-cudagraphs.txt
timeout 120 python sums_profile.py --probes 2 --mode eager > $OUT/profile-eager.txt 2>&1
grep "wall ms" $OUT/profile-eager.txt
cd ../..
# (svd_step.sh ran in the first call of this script, 2026-12-07)
timeout 300 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups lora144,molf-e,molf-e-svd --out $OUT/svd-graphs.json > $OUT/svd-graphs.log 2>&1
tail -6 $OUT/svd-graphs.log
