#!/usr/bin/env bash
# The full LM regimes (quality.py --full, facts and sql) for molf default and molf-E default as
# they ship now (the rate adaptation of 3f6431e), the protocol of RESULTS.md's full LM table:
# facts 4 rates on one validation instance, 3 seeds; sql every rate on 3 validation instances
# (--finalists 0), 5 seeds. One or more device calls with wheel .whl/cur; runs resume from
# .device/lm (carry it, and .device/cache for the pre-trained LM, from call to call).
# LIMIT: seconds for the runs of this call (default 500).
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/gpu.txt
mkdir -p .device/lm .device/cache
common=(--full --device cuda --threads 1 --cache-dir .device/cache --no-progress --resume --lrs 1e-4 3e-4 1e-3 3e-3
    --methods "molf default" "molf-E default")
start=$(date +%s)
# The pre-trained LM once, before the jobs that load it.
python - <<'EOF' 2>&1 | tail -2
import sys; sys.path.insert(0, "benches")
import quality, quality_lm
quality_lm.pretrained_lm(quality.FULL.lm, ".device/cache", "cuda", progress=False)
EOF
echo "pre-training: $(( $(date +%s) - start )) s" | tee -a $OUT/gpu.txt
left=$(( ${LIMIT:-500} - ($(date +%s) - start) ))
timeout -k 15 -s TERM $left python benches/quality.py "${common[@]}" --regimes sql --seeds 5 --val-seeds 3 \
    --finalists 0 --jobs 12 --out .device/lm/sql > $OUT/sql.log 2>&1 &
timeout -k 15 -s TERM $left python benches/quality.py "${common[@]}" --regimes facts --seeds 3 --jobs 4 \
    --out .device/lm/facts > $OUT/facts.log 2>&1 &
sleep 120; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv | tee -a $OUT/gpu.txt
wait
echo "wall $(( $(date +%s) - start )) s" | tee -a $OUT/gpu.txt
# (the routing logs stay behind: too many files to come back)
for r in facts sql; do mkdir -p $OUT/lm/$r; cp .device/lm/$r/{runs.jsonl,results.json,table.txt} $OUT/lm/$r/ 2>/dev/null; done
cp .device/cache/*.pt $OUT/
for r in facts sql; do echo "$r: $(wc -l < .device/lm/$r/runs.jsonl) runs"; tail -16 $OUT/$r.log | grep '^|'; done
