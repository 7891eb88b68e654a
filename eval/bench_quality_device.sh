#!/usr/bin/env bash
# Session 21's quality runs on one lent GPU, six processes sharing it (eval/results/quality.md, top section).
# Inputs: the reference models and corpus copied under .qdata/ (carried; ../shared does not travel).
# Every process writes its rows as they finish; the post-quantization rows start only before --deadline-s.
# Usage: OUT=<dir> [PART=1|2] bash eval/bench_quality_device.sh [deadline_s] [timeout_s]
set -u
DEADLINE=${1:-330}
LIMIT=${2:-520}
OUT=${OUT:-eval/results}
W=$OUT/w
mkdir -p "$W"
D=.qdata
LAYER='loss_aware:projection:exact+layer'
COMMON=(--calib $D/corpus/calib.jsonl.gz --eval $D/corpus/eval.jsonl.gz --random-seeds 0 --skip-rtn --dense 0
        --post blockwise+router --deadline-s "$DEADLINE" --out "$W")
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
run() {  # name model args...
  local name=$1 model=$2; shift 2
  timeout "$LIMIT" python3 eval/bench_quality.py --model $D/models/$model --name "$name" "${COMMON[@]}" "$@" \
    > "$W/$name.log" 2>&1 &
}
if [ "${PART:-1}" = 2 ]; then
  # call 2: costs on the held-back split, GPTQ on all 512 sequences (384 fit + 128 held back), plain rows
  for m in refmoe-qwen3 refmoe-olmoe; do
    run $m-s21heldall $m --held-back 0.25 --uniform 2,3 --variants '' --post ''
  done
  wait
  tar czf "$OUT/quality_s21b.tgz" -C "$W" . && rm -rf "$W"
  exit 0
fi
# call 1 (PART=1)
# the layer-calibrated costs (lever) against ours, calibration text as before; their post rows
run refmoe-qwen3-s21 refmoe-qwen3 --uniform 2,3 --variants "$LAYER" \
    --post-rows "ours[$LAYER] gptq 2.5,ours[$LAYER] gptq 3.0"
run refmoe-olmoe-s21 refmoe-olmoe --uniform 2,3 --variants "$LAYER" \
    --post-rows "ours[$LAYER] gptq 2.5,ours[$LAYER] gptq 3.0"
# the missing post rows of the previous session
run refmoe-qwen3-s21post refmoe-qwen3 --skip-untuned --variants '' \
    --post-rows 'ours gptq 3.0,popularity-only gptq 3.0'
run refmoe-olmoe-s21post refmoe-olmoe --skip-untuned --variants '' \
    --post-rows 'popularity-only gptq 2.5,uniform gptq 3-bit'
# costs measured on the held-back split (calibration on the rest)
run refmoe-qwen3-s21held refmoe-qwen3 --held-back 0.25 --uniform 2,3 --variants "$LAYER" \
    --post-rows 'ours gptq 2.5,popularity-only gptq 2.5'
run refmoe-olmoe-s21held refmoe-olmoe --held-back 0.25 --uniform 2,3 --variants "$LAYER" \
    --post-rows 'ours gptq 2.5,popularity-only gptq 2.5'
# offload: layer against the whole model on the GPU, calibrate .. quantize of the reference recipe
timeout "$LIMIT" python3 eval/offload_check.py --model $D/models/refmoe-qwen3 --calib $D/corpus/calib.jsonl.gz \
    --samples 256 --quantizer rtn --out "$W" > "$W/offload.log" 2>&1 &
(sleep 150; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv > "$W/gpu.txt" 2>&1) &
wait
tar czf "$OUT/quality_s21.tgz" -C "$W" . && rm -rf "$W"
