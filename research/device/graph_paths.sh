#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: which CUDA graph tree path each call of a
# held-out routing run takes under torch.compile's reduce-overhead, without and with
# cudagraph_mark_step_begin() per step.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python research/device/graph_paths.py --steps 36 --out $OUT/paths.json > $OUT/paths.log 2>&1
grep '^{' $OUT/paths.log | tail -12
grep -i "skipping cudagraph\|unable to hit\|re-record\|recompil" $OUT/paths.log | sort | uniq -c | head
timeout 200 python research/device/graph_paths.py --steps 36 --mark-step --out $OUT/paths_mark.json > $OUT/paths_mark.log 2>&1
grep '^{' $OUT/paths_mark.log | tail -12
grep -i "skipping cudagraph\|unable to hit\|re-record\|recompil" $OUT/paths_mark.log | sort | uniq -c | head
