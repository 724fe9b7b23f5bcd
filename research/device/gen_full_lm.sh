#!/usr/bin/env bash
# The generalization suite's full mode on the LM test instances (issue 35), resumable over calls:
# rates per instance on validation over the full scale's grid (3e-5 … 1e-2: sql's best rates reached
# both ends of quality.py's LM grid 1e-4 … 3e-3), molf's lora_lr factor in {1, 10} and molf-E's
# expert form in {ba, svd} chosen with the rate, the judged methods and the paper's routing.
# Carry .whl/cur, .device/gen-cache (the worlds' LMs, from pretrain_worlds.sh) and .device/gen (the
# runs so far). FAMILIES (default "lm-sql lm-facts"), LRS (a grid other than the scale's), SET
# (default test), LIMIT seconds (default 520), JOBS (default 14), METHODS (a subset, e.g. while one
# method's default is in review: its runs are redone after).
set -u
if [ -n "${METHODS:-}" ]; then eval "METHODS=($METHODS)"
else METHODS=("FFT (early stop)" "LoRA (early stop)" AdaLoRA "molf default" "molf-E default" "MoLF (paper)"); fi
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/gpu.txt
out=.device/gen/${SET:-test}
mkdir -p $out
before=$(cat $out/runs.jsonl 2>/dev/null | wc -l)
start=$(date +%s)
timeout -k 15 -s TERM ${LIMIT:-520} python benches/generalization.py --full --device cuda --set ${SET:-test} \
    --families ${FAMILIES:-lm-sql lm-facts} ${LRS:+--lrs $LRS} --lora-factors 1 10 --forms ba svd \
    --methods "${METHODS[@]}" \
    --cache-dir .device/gen-cache --threads 1 --jobs ${JOBS:-14} --resume --no-progress --out $out > $OUT/gen.log 2>&1 &
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tee -a $OUT/gpu.txt
wait
after=$(wc -l < $out/runs.jsonl)
echo "wall $(( $(date +%s) - start )) s, runs $before -> $after" | tee -a $OUT/gpu.txt
mkdir -p $OUT/gen && cp $out/runs.jsonl $OUT/gen/ && cp $out/{results.json,table.txt} $OUT/gen/ 2>/dev/null
tail -30 $OUT/gen.log
