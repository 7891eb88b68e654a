#!/usr/bin/env bash
# Issue 16 on a lent device machine's CPU (sessions 24-27: an AMX Xeon, Emerald Rapids) in one call: CPU flags ->
# (background: each model's exports and GGUFs) -> our C++ modules and the kernel paths (eval/cpu_paths.py) -> the CPU
# kernel tests -> eval/bench_cpu.py per model, 2 threads pinned to 2 physical cores. Results under $OUT.
# Inputs in $C (git-ignored, named in the call's `carry`): llama.cpp.tar.xz (llama-cpp-python 0.3.36's vendor/llama.cpp
# without models/, docs/, media/, benches/, tests/, examples/, pocs/, tools/ui, tools/server, .github/, .devops/ and the
# non-CPU ggml backends: 3.8 MB; made from the sdist that eval/bench_cpu_llama.py downloads; its converter and gguf-py
# are used), ref/ (refmoe-qwen3: its tokenizer.json and tokenizer_config.json, which model (b) takes; the whole model,
# 25 MB, when MODELS has a) and, optionally, bin/ with llama-bench, llama-quantize and llama-batched-bench built
# elsewhere for the device's CPU (GGML_NATIVE=OFF, -march=sapphirerapids and ggml's AVX-512/VNNI/BF16/AMX options,
# static libraries; session 25 tried on the loaded 2-core box and stopped at half after 40 min): without them, or when
# they do not start there, llama.cpp is built on the device (~2.5 min, in the background). LLAMA=0: ours only.
# Session 26: the bench's 2 cores are kept free of the other work (llama.cpp build, exports, tests on the other CPUs),
# and while the tests run, eval/bench_cpu_amx_prefill.py times model (b)'s 2-bit (then 4-bit) plan's prefill on them
# with the dense 4-bit projections on packed_amx and on the int4 copy (MOECOMPRESS_AMX_DENSE_INT4) (DIAG=0: not run;
# TESTS=0: no tests); plans and types in priority order (a cut-short run keeps the first pairs).
# Session 27: MODELS=a,b runs the models in that order, each its own bench_cpu.py run (results cpu_<model>.md/.json);
# model (a)'s plans and types in PLANS_A / GGUF_A (bf16 in GGUF_A: llama.cpp's bf16 GGUF is measured too), model (b)'s
# in the arguments. EARLY=1: while llama.cpp still builds, ours alone on model (a) on the bench's cores (cpu_a_early.md,
# a second sample of ours beside the build on the other CPUs), until EARLY_STOP s before the deadline; off by default:
# in session 27 it got no configuration done in its 45 s (probe + the first fresh process beside the build).
# Session 27's timeline (MODELS=a,b TESTS=0 DIAG=0, deadline 312): C++ modules 65 s, llama.cpp build 126 s, model (a)'s
# bench (12 configurations, 2 probes) 140 s from t=135 s: model (b) was not reached; a and b need a deadline of ~480.
# Usage (repo root, on the device): OUT=<dir> C=<inputs> [MODELS=b] [LLAMA=1] [TESTS=1] [DIAG=1] [EARLY=0]
#   [PLANS_A=4,2,8,3,mixed,bf16] [GGUF_A=Q4_0,Q2_K,Q8_0,Q3_K_M,Q4_K_M,bf16] bash eval/bench_cpu_device.sh [deadline_s] [plans] [gguf]
set -u
C=${C:-.gpu_carry/s27/amx}
OUT=${OUT:-/tmp/amx-out}
DEADLINE=${1:-340}
PLANS=${2:-8,3,2,4,mixed}
GGUF=${3:-Q8_0,Q3_K_M,Q2_K,Q4_0,Q4_K_M}
PLANS_A=${PLANS_A:-4,2,8,3,mixed,bf16}
GGUF_A=${GGUF_A:-Q4_0,Q2_K,Q8_0,Q3_K_M,Q4_K_M,bf16}
MODELS=${MODELS:-b}
LLAMA=${LLAMA:-1}
TESTS=${TESTS:-1}
DIAG=${DIAG:-1}
EARLY=${EARLY:-0}
EARLY_STOP=${EARLY_STOP:-180}  # the early run ends this many seconds before the deadline at the latest
mkdir -p "$OUT" /tmp/amx-logs /tmp/bench-cpu
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
lim() { local l=$(( $(left) - $1 )); [ $l -lt 5 ] && l=5; echo $l; }  # seconds left less $1, at least 5
has() { [[ ",$MODELS," == *",$1,"* ]]; }
plans_of() { [ $1 = a ] && echo $PLANS_A || echo $PLANS; }
types_of() { [ $1 = a ] && echo $GGUF_A || echo $GGUF; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=python3
W=/tmp/bench-cpu
LL=/tmp/llama
SRC=$LL/llama_cpp_python-0.3.36/vendor/llama.cpp
CA=$(realpath "$C")

# 1. the CPU
{ lscpu; echo; lscpu -p=CPU,CORE,SOCKET,NODE; echo; grep -m1 '^flags' /proc/cpuinfo; free -g; uname -a; } > "$OUT/cpu.txt" 2>&1
grep -m1 'model name' /proc/cpuinfo; nproc
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cpu capability', torch.backends.cpu.get_cpu_capability())"

CORES=$(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '$3==0 && !seen[$2]++ {print $1}' | head -2 | paste -sd,)
OTHER=$(lscpu -p=CPU | grep -v '^#' | grep -vxF -e "${CORES%,*}" -e "${CORES#*,}" | paste -sd,)
PIN="taskset -c $OTHER"; echo "bench CPUs $CORES, the rest on $OTHER; models $MODELS"
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
building() { [ -n "$LPID" ] && kill -0 $LPID 2>/dev/null; }

# 3. background, per model: (b) the random-init model (14 threads); then each plan's export in its own process while
#    the bf16 GGUF is written, then llama-quantize for every type at once (bench_cpu.py finds the files and converts
#    nothing); $W/exported_<model>_<plan> marks each export
prep() {
  local m=$1 hf=$W/b-bf16 G=$W/$1-gguf P="--models $1 --no-llama --prepare-only --ref-model $C/ref --workdir $W"
  [ $m = a ] && hf=$CA/ref
  { [ $m = a ] || { OMP_NUM_THREADS=14 $PIN $PY eval/bench_cpu.py $P --plans "" && el "model b built"; }; } &&
  for p in $(plans_of $m | tr , ' '); do { OMP_NUM_THREADS=2 $PIN $PY eval/bench_cpu.py $P --plans $p \
    > /tmp/amx-logs/prep_${m}_$p.out 2>&1 && touch $W/exported_${m}_$p; } & done &&
  { [ "$LLAMA" = 0 ] || { ( cd eval && $PY -c "import bench_cpu_llama as l; from pathlib import Path as P
l.convert(l.LlamaCpp(P('$SRC'), P('$LL/build/bin')), P('$hf'), P('$G'), [])" ) && el "$m: bf16 gguf written" &&
  { while building; do sleep 1; done; } &&
  for t in $(types_of $m | tr , ' '); do [ $t = bf16 ] || ( $LL/build/bin/llama-quantize $G/model-bf16.gguf $G/model-$t.part $t 3 \
    > /tmp/amx-logs/quant_${m}_$t.out 2>&1 && mv $G/model-$t.part $G/model-$t.gguf ) & done; }; } && wait && el "$m prepared"
}
declare -A PREP_PID
for m in $(echo $MODELS | tr , ' '); do prep $m > /tmp/amx-logs/prep_$m.out 2>&1 & PREP_PID[$m]=$!; done

# 4. our C++ modules (the low-bit one, and the -march=native one with the AMX kernels), the kernel paths, the tests
el "building the C++ modules"
( MAX_JOBS=6 $PIN $PY -c "from moecompress.runtime.kernels import cpu_lowbit; print('lowbit', cpu_lowbit.available())" ) \
  > /tmp/amx-logs/build_lowbit.out 2>&1 &
K1=$!
MAX_JOBS=6 $PIN $PY -c "from moecompress.runtime.kernels import cpu_kernels; print('cpu_kernels', cpu_kernels.available(), 'amx', cpu_kernels.amx())" 2>&1 | tail -3
wait $K1; tail -3 /tmp/amx-logs/build_lowbit.out
el "C++ modules done"
$PY eval/cpu_paths.py > "$OUT/paths.txt" 2>&1; grep "cpu:amx " "$OUT/paths.txt"
TPID=
if [ "$TESTS" = 1 ]; then
  el "tests (CPUs $OTHER)"
  ( OMP_NUM_THREADS=2 timeout 150 $PIN $PY -m pytest -q -n 8 -p no:cacheprovider -rs --durations=12 tests/test_runtime_kernels.py \
    tests/test_cpu_*.py > "$OUT/tests.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/tests.txt" ) &
  TPID=$!
fi
if [ "$DIAG" = 1 ] && has b; then
  el "the prefill diagnosis (CPUs $CORES)"
  for p in 2 4; do
    while [ ! -e $W/exported_b_$p ] && [ $(left) -gt 250 ]; do sleep 1; done
    [ -e $W/exported_b_$p ] && [ $(left) -gt 250 ] || break
    timeout $(lim 240) taskset -c "$CORES" $PY eval/bench_cpu_amx_prefill.py $W/b-$p-densematch-head8 --threads 2 \
      --json "$OUT/amx_prefill_$p.json" > "$OUT/amx_prefill_$p.txt" 2>&1; echo "prefill diagnosis $p rc=$?"
    grep -E "^ |^\[" "$OUT/amx_prefill_$p.txt"
  done
fi
exported() { for p in $(plans_of $1 | tr , ' '); do [ -e $W/exported_${1}_$p ] || return 1; done; }
if [ "$EARLY" = 1 ] && has a && building; then  # the bench's cores would wait for llama.cpp: ours on (a) meanwhile
  while ! exported a && [ $(left) -gt $EARLY_STOP ]; do sleep 1; done
  if exported a && building; then
    el "early: ours on model (a) while llama.cpp builds (load $(cut -d' ' -f1-3 /proc/loadavg))"
    timeout $(lim $EARLY_STOP) taskset -c "$CORES" $PY eval/bench_cpu.py --models a --plans "$PLANS_A" --no-llama --rounds 1 --threads 2 \
      --ref-model $C/ref --workdir $W --out "$OUT/cpu_a_early.md" > /tmp/amx-logs/bench_a_early.txt 2>&1
    echo "early bench rc=$? (load $(cut -d' ' -f1-3 /proc/loadavg); llama.cpp still building: $(building && echo yes || echo no))"
  fi
fi
if [ -n "$TPID" ]; then
  wait $TPID
  tail -1 "$OUT/tests.txt"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
  el "tests done"
fi

# 5. the benchmark on 2 physical cores of one socket, model by model, once its inputs are there
for m in $(echo $MODELS | tr , ' '); do
  while kill -0 ${PREP_PID[$m]} 2>/dev/null && [ $(left) -gt 60 ]; do sleep 1; done
  grep '^\[' /tmp/amx-logs/prep_$m.out; [ -n "$LPID" ] && tail -1 /tmp/amx-logs/llama_build.out
  [ $(left) -gt 30 ] || { el "no time left for model $m"; continue; }
  el "benchmark of model $m on CPUs $CORES, $(left) s left (load $(cut -d' ' -f1-3 /proc/loadavg))"
  T=$(types_of $m)
  ENGINES="--gguf $T"; [[ ",$T," == *",bf16,"* ]] || ENGINES="$ENGINES --skip-gguf-bf16"
  [ "$LLAMA" = 0 ] || [ ! -x $LL/build/bin/llama-bench ] && ENGINES=--no-llama  # never a build on the bench's cores
  timeout $(lim 3) taskset -c "$CORES" $PY eval/bench_cpu.py --models $m --plans "$(plans_of $m)" $ENGINES \
    --rounds 1 --threads 2 --ref-model $C/ref --workdir $W --llama-dir $LL --out "$OUT/cpu_$m.md" > /tmp/amx-logs/bench_$m.txt 2>&1
  echo "bench $m rc=$?"
  grep -A12 '^| ours | llama.cpp' "$OUT/cpu_$m.md" 2>/dev/null
done
el "done"
cp $W/*-gguf/convert.log /tmp/amx-logs/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp/amx-logs .
