#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the CUDA tests of the probe's new parts (the
# dense trial's save-and-pull kernel, the spectral trial as a CUDA graph's replay), the
# spectral work alone eager and replayed, the probe under CUDA graphs beside FFT
# (loop_bench), then where the probe step waits (probe_lag).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_trial_pull.py tests/test_graph_cache.py \
  tests/test_spectral_gemm.py tests/test_probe_sums.py tests/test_heldout.py 2>&1 | tail -4
(cd research/device && timeout 60 python spectral_graph.py > $OUT/spectral_graph.log 2>&1; tail -14 $OUT/spectral_graph.log)
timeout 270 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups fft,molf-heldout-param --heldout-steps 50 --out $OUT/graphs.json > $OUT/graphs.log 2>&1
tail -9 $OUT/graphs.log
(cd research/device && timeout 100 python probe_lag.py --mode cudagraphs --probes 2 --out $OUT/lag.json > $OUT/lag.log 2>&1)
grep "probe step" $OUT/lag.log
