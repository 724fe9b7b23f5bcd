#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the dense and LoRA products in one Triton GEMM
# against cuBLAS's pair (research/device/dual_gemm.py), then where a replayed no-grad
# forward's time goes under CUDA graphs (research/device/nograd_replay.sh).
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python research/device/dual_gemm.py --reps 30 --out $OUT/dual_gemm.json > $OUT/dual_gemm.log 2>&1
tail -18 $OUT/dual_gemm.log
bash research/device/nograd_replay.sh
