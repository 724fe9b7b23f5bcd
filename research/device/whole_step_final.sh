#!/usr/bin/env bash
# One device call (issue #32's closing table), wheel .whl/cur: the optimizer step alone
# (step_bench, bf16 rows), then the whole step eager at 4x512, its ratios to its own FFT row.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/gpu.txt
lb() { name=$1; shift; timeout $1 python benches/loop_bench.py "${@:2}" --out $OUT/$name.json > $OUT/$name.log 2>&1; tail -14 $OUT/$name.log | grep '^|'; }
timeout 120 python benches/step_bench.py --dtypes bf16 --rounds 5 --json $OUT/step.json > $OUT/step.log 2>&1; grep '^| bf16' $OUT/step.log
lb 4x512 170 --batches 4x512 --steps 12 --heldout-steps 50 --setups fft,lora,molf-param,molf-heldout-param,molf-e,lora144
