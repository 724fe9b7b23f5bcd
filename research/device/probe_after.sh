#!/usr/bin/env bash
# One device call (issue #32): the CUDA tests of the probe's changed parts with the wheel in
# .whl/cur, then `probe_lag.py` under CUDA graphs with .whl/cur and with .whl/base (the wheel
# before the change) side by side.
set -u
for w in cur base; do pip install --no-deps --quiet --target /tmp/$w .whl/$w/*.whl 2>&1 | grep -v WARNING | tail -1; done
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=/tmp/cur timeout 200 python -m pytest -q -p no:cacheprovider tests/test_probe_sums.py tests/test_spectral_gemm.py tests/test_heldout.py tests/test_lora_form.py 2>&1 | tail -3
cd research/device
for w in cur base; do
  PYTHONPATH=/tmp/$w timeout 200 python probe_lag.py --mode cudagraphs --probes 2 --out $OUT/lag-$w.json > $OUT/lag-$w.log 2>&1
  echo "== $w"; grep "probe step" $OUT/lag-$w.log
done
