#!/bin/bash
# Issue 14 on a lent GPU machine in one call (session 27, eval/results/gpu_prefill_s27.md): the CUDA tests beside the
# prefill bench's compile warm-up, then eval/bench_gpu_prefill.py, then eval/bench_gpu_trace.py's end-to-end rows
# while ~460 s allow. The trace needs .gpu_carry/refmoe-qwen3-{bf16,mix,4bit} (made on a CPU box by
# `PYTHONPATH=. python eval/bench_gpu_trace.py --export`) in the call's carry.
# Usage (repo root, on the device): OUT=<dir> bash eval/bench_gpu_device.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
python -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())' 2>&1 | tee $OUT/env.txt
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv >> $OUT/env.txt 2>&1
TESTS="tests/test_cuda_dequant_prefill.py tests/test_gpu_launch_rules.py tests/test_graph_decode.py tests/test_cuda_kernels.py"
if python -c 'import xdist' 2>/dev/null; then
  (timeout 170 python -m pytest -v -n 12 -p no:cacheprovider $TESTS > $OUT/tests.txt 2>&1; echo "rc=$? t=$(el)" >> $OUT/tests.txt) &
else
  (timeout 170 python -m pytest -v -p no:cacheprovider $TESTS > $OUT/tests.txt 2>&1; echo "rc=$? t=$(el) (no xdist)" >> $OUT/tests.txt) &
fi
TP=$!
WP=""
for i in 0 1; do timeout 150 python eval/bench_gpu_prefill.py --warm $i > $OUT/warm$i.log 2>&1 & WP="$WP $!"; done
wait $WP; echo "warm done t=$(el)"
wait $TP; echo "tests done t=$(el)"; tail -3 $OUT/tests.txt
# the timed prefill bench: no new case after 100 s of it (the GPU is otherwise idle now)
timeout 200 python eval/bench_gpu_prefill.py --out $OUT --deadline 100 > $OUT/prefill.log 2>&1
echo "prefill done rc=$? t=$(el)"
LEFT=$(( 460 - $(el) ))
echo "left for the trace: $LEFT s"
if [ $LEFT -gt 90 ]; then
  timeout $LEFT python eval/bench_gpu_trace.py --out $OUT --variants "bf16 batched_mm" "packed mix" "packed 4bit" \
    --skip-settings dense_gated --rounds 5 --child-timeout $(( (LEFT - 5) / 3 )) > $OUT/trace.log 2>&1
  echo "trace done rc=$? t=$(el)"
fi
echo "PASSED $(grep -c " PASSED" $OUT/tests.txt) FAILED $(grep -c " FAILED" $OUT/tests.txt) SKIPPED $(grep -c " SKIPPED" $OUT/tests.txt) ERROR $(grep -c " ERROR" $OUT/tests.txt)"; tail -2 $OUT/tests.txt
