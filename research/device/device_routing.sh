#!/usr/bin/env bash
# One device call (issue #32): CUDA tests of the changed paths; the whole step (loop_bench)
# with the wheel after the device-decided exact step (.whl/new); the step's breakdown before
# (.whl/cur) and after. Short tables last.
set -u
for w in cur new; do pip install --no-deps --quiet --target /tmp/$w .whl/$w/*.whl 2>&1 | grep -v WARNING | tail -1; done
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=/tmp/new timeout 100 python -m pytest -q -x -p no:cacheprovider tests/test_device_routing.py tests/test_fused.py 2>&1 | tail -3 > $OUT/tests.txt
lb() { name=$1; shift; PYTHONPATH=/tmp/new timeout $1 python benches/loop_bench.py "${@:2}" --out $OUT/$name.json > $OUT/$name.log 2>&1; }
lb 4x512 220 --batches 4x512 --steps 12 --heldout-steps 50 --setups fft,molf,molf-param,molf-heldout-param,lora
PYTHONPATH=/tmp/cur timeout 70 python research/device/breakdown.py --setups molf-param --out $OUT/bd-cur.json > $OUT/bd-cur.log 2>&1
PYTHONPATH=/tmp/new timeout 130 python research/device/breakdown.py --setups molf-param,molf-heldout-param --out $OUT/bd-new.json > $OUT/bd-new.log 2>&1
cat $OUT/tests.txt; for f in 4x512; do tail -12 $OUT/$f.log | grep '^|'; done; grep -h '^|' $OUT/bd-cur.log $OUT/bd-new.log
