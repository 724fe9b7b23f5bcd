#!/usr/bin/env bash
# One short device call (issue #32): CUDA tests of the device-decided step; the whole step
# (loop_bench) of FFT and molf with the wheel after it (.whl/new) and molf before (.whl/cur).
set -u
for w in cur new; do pip install --no-deps --quiet --target /tmp/$w .whl/$w/*.whl 2>&1 | grep -v WARNING | tail -1; done
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=/tmp/new timeout 80 python -m pytest -q -x -p no:cacheprovider tests/test_device_routing.py 2>&1 | tail -2 > $OUT/tests.txt
lb() { name=$1; w=$2; shift 2; PYTHONPATH=/tmp/$w timeout $1 python benches/loop_bench.py "${@:2}" --out $OUT/$name.json > $OUT/$name.log 2>&1; }
lb new new 90 --batches 4x512 --steps 10 --warmup 4 --setups fft,molf-param
lb cur cur 50 --batches 4x512 --steps 10 --warmup 4 --setups molf-param
cat $OUT/tests.txt; for f in new cur; do tail -12 $OUT/$f.log | grep '^|'; done
