#!/usr/bin/env bash
# Issue 16 on a lent device machine's CPU (sessions 24-25: an AMX Xeon, Emerald Rapids) in one call: CPU flags ->
# (background: model (b), our exports and the GGUFs) -> our C++ modules and the kernel paths (eval/cpu_paths.py) ->
# the CPU kernel tests -> eval/bench_cpu.py on model (b), 2 threads pinned to 2 physical cores. Results under $OUT.
# Inputs in $C (git-ignored, named in the call's `carry`): llama.cpp.tar.xz (llama-cpp-python 0.3.36's vendor/llama.cpp
# without models/, docs/, media/, benches/, tests/, examples/, pocs/, tools/ui, tools/server and the non-CPU ggml
# backends: 3.8 MB; made from the sdist that eval/bench_cpu_llama.py downloads; its converter and gguf-py are used),
# ref/ (refmoe-qwen3's tokenizer.json and tokenizer_config.json, which model (b) takes) and, optionally, bin/ with
# llama-bench, llama-quantize and llama-batched-bench built elsewhere for the device's CPU (GGML_NATIVE=OFF,
# -march=sapphirerapids and ggml's AVX-512/VNNI/BF16/AMX options, static libraries; session 25 tried on the loaded
# 2-core box and stopped at half after 40 min): without them, or when they do not start there, llama.cpp is built on
# the device (~2.5 min, in the background). LLAMA=0: ours only (no llama.cpp build, no GGUFs).
# Session 26: the bench's 2 cores are kept free of the other work (llama.cpp build, exports, tests on the other CPUs),
# and while the tests run, eval/bench_cpu_amx_prefill.py times the 2-bit (then 4-bit) plan's prefill on them with the
# dense 4-bit projections on packed_amx and on the int4 copy (MOECOMPRESS_AMX_DENSE_INT4), before and after the huge
# pages; plans and types in priority order (a cut-short run keeps the first pairs).
# Usage (repo root, on the device): OUT=<dir> C=<inputs> [LLAMA=0] bash eval/bench_cpu_device.sh [deadline_s] [plans] [gguf]
set -u
C=${C:-.gpu_carry/s26/amx}
OUT=${OUT:-/tmp/amx-out}
DEADLINE=${1:-340}
PLANS=${2:-8,3,2,4,mixed}
GGUF=${3:-Q8_0,Q3_K_M,Q2_K,Q4_0,Q4_K_M}
LLAMA=${LLAMA:-1}
mkdir -p "$OUT" /tmp/amx-logs
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
lim() { local l=$(( $(left) - $1 )); [ $l -lt 5 ] && l=5; echo $l; }  # seconds left less $1, at least 5
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=python3
W=/tmp/bench-cpu
LL=/tmp/llama
SRC=$LL/llama_cpp_python-0.3.36/vendor/llama.cpp

# 1. the CPU
{ lscpu; echo; lscpu -p=CPU,CORE,SOCKET,NODE; echo; grep -m1 '^flags' /proc/cpuinfo; free -g; uname -a; } > "$OUT/cpu.txt" 2>&1
grep -m1 'model name' /proc/cpuinfo; nproc
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cpu capability', torch.backends.cpu.get_cpu_capability())"

CORES=$(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '$3==0 && !seen[$2]++ {print $1}' | head -2 | paste -sd,)
OTHER=$(lscpu -p=CPU | grep -v '^#' | grep -vxF -e "${CORES%,*}" -e "${CORES#*,}" | paste -sd,)
PIN="taskset -c $OTHER"; echo "bench CPUs $CORES, the rest on $OTHER"
taskset -pc "$OTHER" $$ > /dev/null  # everything this script starts runs off the bench's CPUs unless pinned there

# 2. llama.cpp: the carried binaries if they start here, else a build (background)
mkdir -p $LL/build/bin && tar xJf $C/llama.cpp.tar.xz -C $LL
carried() {  # the carried tools copied into the build folder, each one starting (exit below 126: no missing library,
  [ -x $C/bin/llama-bench ] || return 1  # no illegal instruction)
  for t in llama-bench llama-quantize llama-batched-bench; do
    cp $C/bin/$t $LL/build/bin/ || return 1
    $LL/build/bin/$t --help >> /tmp/amx-logs/bin_check.out 2>&1; [ $? -lt 126 ] || return 1
  done
}
LPID=
if [ "$LLAMA" = 0 ]; then
  el "ours only (LLAMA=0)"
elif carried; then
  el "carried llama.cpp binaries start"
else
  el "carried binaries missing or broken (see bin_check.out): building llama.cpp"; rm -f $LL/build/bin/llama-*
  ( $PIN nice -n 5 $PY eval/bench_cpu_llama.py --build-only --llama-dir $LL --jobs 12 ) > /tmp/amx-logs/llama_build.out 2>&1 &
  LPID=$!
fi

# 3. background: model (b) (16 threads), then each plan's export in its own process while the bf16 GGUF is written,
#    then llama-quantize for every type at once (bench_cpu.py finds the files and converts nothing)
PREP="--models b --no-llama --prepare-only --ref-model $C/ref --workdir $W"
G=$W/b-gguf
( OMP_NUM_THREADS=14 $PIN $PY eval/bench_cpu.py $PREP --plans "" && el "model b built" &&
  for p in ${PLANS//,/ }; do { OMP_NUM_THREADS=2 $PIN $PY eval/bench_cpu.py $PREP --plans $p > /tmp/amx-logs/prep_$p.out 2>&1 &&
    touch $W/exported_$p; } & done &&
  { [ "$LLAMA" = 0 ] || { ( cd eval && $PY -c "import bench_cpu_llama as l; from pathlib import Path as P
l.convert(l.LlamaCpp(P('$SRC'), P('$LL/build/bin')), P('$W/b-bf16'), P('$G'), [])" ) && el "bf16 gguf written" &&
  { [ -z "$LPID" ] || while kill -0 $LPID 2>/dev/null; do sleep 1; done; } &&
  for t in ${GGUF//,/ }; do ( $LL/build/bin/llama-quantize $G/model-bf16.gguf $G/model-$t.part $t 3 > /tmp/amx-logs/quant_$t.out 2>&1 &&
    mv $G/model-$t.part $G/model-$t.gguf ) & done; }; } && wait && el "prepared" ) > /tmp/amx-logs/prep_b.out 2>&1 &
BPID=$!

# 4. our C++ modules (the low-bit one, and the -march=native one with the AMX kernels), the kernel paths, the tests
el "building the C++ modules"
( MAX_JOBS=6 $PIN $PY -c "from moecompress.runtime.kernels import cpu_lowbit; print('lowbit', cpu_lowbit.available())" ) \
  > /tmp/amx-logs/build_lowbit.out 2>&1 &
K1=$!
MAX_JOBS=6 $PIN $PY -c "from moecompress.runtime.kernels import cpu_kernels; print('cpu_kernels', cpu_kernels.available(), 'amx', cpu_kernels.amx())" 2>&1 | tail -3
wait $K1; tail -3 /tmp/amx-logs/build_lowbit.out
el "C++ modules done"
$PY eval/cpu_paths.py > "$OUT/paths.txt" 2>&1; grep "cpu:amx " "$OUT/paths.txt"
el "tests (CPUs $OTHER) and the prefill diagnosis (CPUs $CORES)"
( OMP_NUM_THREADS=2 timeout 150 $PIN $PY -m pytest -q -n 8 -p no:cacheprovider -rs --durations=12 tests/test_runtime_kernels.py \
  tests/test_cpu_*.py > "$OUT/tests.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/tests.txt" ) &
TPID=$!
for p in 2 4; do
  while [ ! -e $W/exported_$p ] && [ $(left) -gt 250 ]; do sleep 1; done
  [ -e $W/exported_$p ] && [ $(left) -gt 250 ] || break
  timeout $(lim 240) taskset -c "$CORES" $PY eval/bench_cpu_amx_prefill.py $W/b-$p-densematch-head8 --threads 2 \
    --json "$OUT/amx_prefill_$p.json" > "$OUT/amx_prefill_$p.txt" 2>&1; echo "prefill diagnosis $p rc=$?"
  grep -E "^ |^\[" "$OUT/amx_prefill_$p.txt"
done
wait $TPID
tail -1 "$OUT/tests.txt"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
el "tests done"

# 5. the benchmark on 2 physical cores of one socket, once the inputs are there
while kill -0 $BPID 2>/dev/null && [ $(left) -gt 60 ]; do sleep 1; done
cat /tmp/amx-logs/prep_b.out | grep '^\['; [ -n "$LPID" ] && tail -2 /tmp/amx-logs/llama_build.out
el "benchmark on CPUs $CORES, $(left) s left"
ENGINES="--gguf $GGUF --skip-gguf-bf16"; [ "$LLAMA" = 0 ] && ENGINES=--no-llama
timeout $(lim 3) taskset -c "$CORES" $PY eval/bench_cpu.py --models b --plans "$PLANS" $ENGINES \
  --rounds 1 --threads 2 --ref-model $C/ref --workdir $W --llama-dir $LL --out "$OUT/cpu_b.md" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
el "done"
cp "$OUT/bench.txt" /tmp/amx-logs/ 2>/dev/null; rm -f "$OUT/bench.txt"
cp $G/convert.log /tmp/amx-logs/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp/amx-logs .
cat "$OUT/cpu_b.md" 2>/dev/null | tail -22
