#!/usr/bin/env bash
# One device call (issue #32), wheel .whl/cur: the CUDA tests of held-out offload; the whole step
# eager at 4x512 for FFT, paper routing and held-out routing with and without offload (param
# state); the LoRA GEMMs one by one; then held-out routing under CUDA graphs.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_heldout_offload.py tests/test_shrink_backup.py \
  tests/test_probe_sums.py 2>&1 | tail -15 > $OUT/tests.txt
timeout 240 python benches/loop_bench.py --batches 4x512 --steps 12 --heldout-steps 50 \
  --setups fft,molf-param,molf-heldout-param,molf-heldout-offload --out $OUT/eager.json > $OUT/eager.log 2>&1
timeout 60 python research/device/lora_gemms.py > $OUT/gemms.txt 2>&1
(cd research/device && timeout 90 python epilogue_layer.py --out $OUT/epilogue.json > $OUT/epilogue.log 2>&1)
timeout 150 python benches/loop_bench.py --batches 4x512 --steps 12 --heldout-steps 50 --modes cudagraphs \
  --setups fft,molf-heldout-param --out $OUT/cudagraphs.json > $OUT/cudagraphs.log 2>&1
cat $OUT/tests.txt | tail -3; grep '^|' $OUT/eager.log; grep '^|' $OUT/cudagraphs.log; cat $OUT/gemms.txt; tail -10 $OUT/epilogue.log
