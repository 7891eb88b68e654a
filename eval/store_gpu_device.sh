#!/bin/bash
# The GPU tier of the expert store on a lent GPU machine, in one call (session 27, eval/results/store_gpu_s27.md): time
# at 50 % (two rounds), hit rates on both reference models at 50 %, the GPU store tests, hit rates at 25/75 %, then
# time at 25/75 % while the deadline allows. LIMIT: seconds for the whole command; results under $OUT.
# Input (git-ignored, in the call's carry): .gpu_carry/s27/g1/data, made on a CPU box by
#   .venv/bin/python eval/bench_store.py --gpu-prepare .gpu_carry/s27/g1/data --models refmoe-qwen3,refmoe-olmoe \
#       --threads 1 --docs 2 --length 49
# Usage (repo root, on the device): LIMIT=360 OUT=<dir> bash eval/store_gpu_device.sh
set -u
START=$(date +%s); LIMIT=${LIMIT:-400}
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
cap() { local l=$(( $(left) - $2 )); [ $l -gt $1 ] && l=$1; [ $l -lt 5 ] && l=5; echo $l; }
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())'
nproc; uptime
ROOT=$PWD; W=/tmp/w; DATA=${DATA:-$ROOT/.gpu_carry/s27/g1/data}
filter() { grep -v "Loading weights\|FutureWarning\|output = func\|deprecated" ; }
HC=("LRU, graphs" "pin + prefetch (router + refine, precision >= 0.5), graphs"
    "prefetch in graph (router + refine, precision >= 0.5)" "pin 0.25 + prefetch in graph" "pin + prefetch in graph (GPU default)")
cd eval
T=$(cap 170 160); echo "== step 1: time 50 % (limit $T s, left $(left))"
STORE_GPU_REPEAT=2 timeout $T python3 bench_store.py --tier gpu --gpu-parts time --out-dir $OUT --out store_gpu_s27_time \
  --work $W --threads 8 --big-tokens 48 --budgets 0.5 --configs "${HC[0]}" "${HC[1]}" "${HC[2]}" "${HC[4]}" \
  2>&1 | filter > $OUT/step1.log; echo "rc ${PIPESTATUS[0]}"
grep "^50%\|part\|Error" $OUT/step1.log | cut -c1-330
T=$(cap 60 100); echo "== step 2: hits 50 % (limit $T s, left $(left))"
timeout $T python3 bench_store.py --tier gpu --gpu-parts hits --gpu-data $DATA --models refmoe-qwen3,refmoe-olmoe \
  --out-dir $OUT --out store_gpu_s27_hits50 --work $W --threads 8 --budgets 0.5 --configs "${HC[@]}" \
  2>&1 | filter > $OUT/step2.log; echo "rc ${PIPESTATUS[0]}"
grep "^refmoe\|part\|Error" $OUT/step2.log | cut -c1-230
cd $ROOT
T=$(cap 120 10); echo "== step 3: tests (limit $T s, left $(left))"
timeout $T python3 -m pytest -q -x tests/test_store_gpu.py tests/test_store.py -k gpu -p no:cacheprovider 2>&1 | tail -12
cd eval
T=$(cap 80 5); echo "== step 4: hits 25/75 % (limit $T s, left $(left))"
[ $T -gt 25 ] && timeout $T python3 bench_store.py --tier gpu --gpu-parts hits --gpu-data $DATA --models refmoe-qwen3,refmoe-olmoe \
  --out-dir $OUT --out store_gpu_s27_hits2575 --work $W --threads 8 --budgets 0.25 0.75 --configs "${HC[0]}" "${HC[2]}" "${HC[4]}" \
  2>&1 | filter > $OUT/step4.log
grep "^refmoe\|part\|Error" $OUT/step4.log 2>/dev/null | cut -c1-230
T=$(cap 90 3); echo "== step 5: time 25/75 % (limit $T s, left $(left))"
[ $T -gt 40 ] && timeout $T python3 bench_store.py --tier gpu --gpu-parts time --out-dir $OUT --out store_gpu_s27_budgets \
  --work $W --threads 8 --big-tokens 48 --budgets 0.25 0.75 --configs "${HC[0]}" "${HC[2]}" "${HC[4]}" 2>&1 | filter > $OUT/step5.log
grep "^25%\|^75%\|part\|Error" $OUT/step5.log 2>/dev/null | cut -c1-330
echo "== done at $(( $(date +%s) - START )) s"
