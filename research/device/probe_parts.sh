#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the held-out probe's parts (synced), under CUDA graphs.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 400 python research/device/breakdown.py --setups molf-heldout-param --mode cudagraphs --out $OUT/parts.json 2>&1 | tail -3
