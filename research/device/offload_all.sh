#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: Heldout(offload=True) with θ and the held-out
# gradient in host memory too — its CUDA tests, then the whole step's time and peak memory,
# eager, and with GRAPHS=1 under CUDA graphs too (4x512, 50 steps with 5 probes).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 80 python -m pytest -q -p no:cacheprovider tests/test_heldout_offload.py tests/test_probe_sums.py \
  > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
# The state-dict test must fail where the state dict does not wait for the copies.
timeout 40 python -c "import sys, pytest, molf.heldout as h; h.HeldoutProbe.settle = lambda self: None; \
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_heldout_offload.py', '-k', 'at_once']))" \
  > $OUT/tests-no-settle.log 2>&1; echo "without settle: rc $? (1: the test failed, as it must)"
timeout 150 python benches/loop_bench.py --batches 4x512 --steps 12 \
  --setups fft,molf-heldout-offload,molf-heldout-param --heldout-steps 50 --out $OUT/eager.json > $OUT/eager.log 2>&1
grep -E 'eager|probe' $OUT/eager.log | tail -12
[ "${GRAPHS:-0}" = 1 ] && timeout 150 python benches/loop_bench.py --batches 4x512 --steps 12 --modes cudagraphs \
  --setups fft,molf-heldout-offload,molf-heldout-param --heldout-steps 50 --out $OUT/graphs.json > $OUT/graphs.log 2>&1 \
  ; grep -E 'cudagraphs|probe' $OUT/graphs.log | tail -12
