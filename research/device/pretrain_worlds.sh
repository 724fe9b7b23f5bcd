#!/usr/bin/env bash
# The generalization suite's LM worlds (families.py WORLDS) pre-trained at the full scale, one
# process per world on one GPU, into .device/gen-cache (they come back under $OUT, to be carried
# by the full mode's calls); beside them, if SQLBASE=1, research/device/full_sql_baselines.sh's
# runs (carry .device/cache). WORLDS: the worlds (default "3001 3002 3003 2001"). Wheel .whl/cur.
set -u
pip install --no-deps --quiet --target /tmp/cur .whl/cur/*.whl 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=/tmp/cur
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
start=$(date +%s)
mkdir -p .device/gen-cache
for w in ${WORLDS:-3001 3002 3003 2001}; do
    python - "$w" > $OUT/pretrain-$w.log 2>&1 <<'PY' &
import sys, time; sys.path.insert(0, "benches")
import quality, quality_lm
t = time.time()
quality_lm.pretrained_lm(quality.FULL.lm, ".device/gen-cache", "cuda", progress=False, world_seed=int(sys.argv[1]))
print(f"world {sys.argv[1]}: {time.time() - t:.0f} s")
PY
done
if [ "${SQLBASE:-0}" = 1 ]; then
    sleep 5
    bash research/device/full_sql_baselines.sh
fi
wait
echo "wall $(( $(date +%s) - start )) s" | tee -a $OUT/gpu.txt
cat $OUT/pretrain-*.log >> $OUT/gpu.txt; rm -f $OUT/pretrain-*.log
mkdir -p $OUT/gen-cache && cp .device/gen-cache/*.pt $OUT/gen-cache/
ls -la $OUT/gen-cache; cat $OUT/gpu.txt
