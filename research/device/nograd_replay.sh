#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: where a replayed no-grad forward's time goes
# under CUDA graphs (research/device/nograd_replay.py).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 280 python research/device/nograd_replay.py --out $OUT/nograd_replay.json > $OUT/nograd_replay.log 2>&1
tail -45 $OUT/nograd_replay.log
