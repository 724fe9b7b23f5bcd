#!/usr/bin/env bash
# Diagnose: the probe-sums test on CUDA (full failure text), aligned vs unaligned items; MoLF-E before/after the layer change.
set -u
for w in m0 m1; do pip install --no-deps --quiet --target /tmp/$w .whl/$w/*.whl 2>&1 | grep -v WARNING | tail -1; done
PYTHONPATH=/tmp/m1 timeout 120 python -m pytest -q -p no:cacheprovider tests/test_probe_sums.py --tb=short 2>&1 | grep -v "^  warnings" | tail -45 | tee $OUT/probe_tests.txt
PYTHONPATH=/tmp/m1 timeout 60 python research/device/probe_align.py 2>&1 | tail -20
for w in m0 m1; do PYTHONPATH=/tmp/$w timeout 80 python benches/loop_bench.py --batches 4x512 --steps 10 --setups lora144,molf-e --out $OUT/e-$w.json 2>&1 | grep "^| [PM]"; done
