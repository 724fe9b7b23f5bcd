#!/usr/bin/env bash
# One device call (issue #32): CUDA tests of the changed paths; the whole step (loop_bench)
# with the wheel after the device-decided exact step (.whl/new) and before it (.whl/cur,
# molf only); the held-out probe's parts. Short tables last.
set -u
for w in cur new; do pip install --no-deps --quiet --target /tmp/$w .whl/$w/*.whl 2>&1 | grep -v WARNING | tail -1; done
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=/tmp/new timeout 110 python -m pytest -q -x -p no:cacheprovider tests/test_device_routing.py tests/test_fused.py tests/test_heldout_rate.py 2>&1 | tail -3 > $OUT/tests.txt
lb() { name=$1; w=$2; shift 2; PYTHONPATH=/tmp/$w timeout $1 python benches/loop_bench.py "${@:2}" --out $OUT/$name.json > $OUT/$name.log 2>&1; }
lb new new 190 --batches 4x512 --steps 12 --heldout-steps 30 --setups fft,molf-param,molf-heldout-param
lb cur cur 70 --batches 4x512 --steps 12 --setups fft,molf-param
cat $OUT/tests.txt; for f in new cur; do tail -12 $OUT/$f.log | grep '^|'; done
