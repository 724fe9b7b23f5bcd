#!/usr/bin/env bash
# Full sql with the pre-trained LM of full_lm_defaults.sh (carry .device/cache): FFT, LoRA,
# AdaLoRA and MoLF (paper) (or METHODS_CSV) at the suite's sql rate 1e-3, 5 seeds (one rate: no selection), to
# put molf's rows of that LM beside the baselines of the same LM. Wheel .whl/cur.
set -u
[ -d /tmp/cur/molf ] || pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/gpu.txt
IFS=, read -ra METHODS <<< "${METHODS_CSV:-FFT,LoRA,AdaLoRA,MoLF (paper)}"
start=$(date +%s)
timeout -k 15 -s TERM ${LIMIT:-400} python benches/quality.py --full --device cuda --threads 1 \
    --cache-dir .device/cache --no-progress --resume --lrs 1e-3 --regimes sql --seeds 5 \
    --methods "${METHODS[@]}" --jobs ${JOBS:-16} --out .device/lm/sqlbase > $OUT/sqlbase.log 2>&1
echo "sql baselines: wall $(( $(date +%s) - start )) s" | tee -a $OUT/gpu.txt
mkdir -p $OUT/sqlbase && cp .device/lm/sqlbase/{runs.jsonl,table.txt} $OUT/sqlbase/ 2>/dev/null
tail -20 $OUT/sqlbase.log | grep '^|'
