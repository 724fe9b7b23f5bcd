#!/usr/bin/env bash
# One device call: install the carried wheel, then loop_bench rows by priority, then CUDA tests of the new paths.
# usage: bash research/device/whole_step.sh WHEEL_DIR
set -u
W=$1
pip install --no-deps --quiet --target /tmp/x $W/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/x
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/gpu.txt
lb() { name=$1; shift; timeout $1 python benches/loop_bench.py "${@:2}" --out $OUT/$name.json > $OUT/$name.log 2>&1; tail -14 $OUT/$name.log | grep '^|'; }
lb 4x512 200 --batches 4x512 --steps 12 --heldout-steps 50 --setups fft,lora,molf,molf-param,molf-heldout,molf-heldout-param,molf-e,lora144
lb 4x512-compile 170 --batches 4x512 --steps 12 --modes compile --setups fft,molf-param,lora
lb 16x512 80 --batches 16x512 --steps 8 --setups fft,molf,molf-param
timeout 90 python -m pytest -q -x -p no:cacheprovider tests/test_probe_sums.py tests/test_shrink_backup.py tests/test_routed_linear.py tests/test_layer_host.py 2>&1 | tail -3 | tee $OUT/tests.txt
