#!/usr/bin/env bash
# Issue 16 on a lent device machine's CPU (session 24: an AMX Xeon) in one call: CPU flags -> (background: llama.cpp
# built from a trimmed source package, model (b) and our exports) -> our C++ modules and the kernel paths
# (eval/cpu_paths.py) -> the CPU kernel tests -> GGUF conversion -> eval/bench_cpu.py on model (b), 2 threads pinned
# to 2 physical cores, then an A/B of our 4-bit plan on the next ISA down. Results under $OUT.
# Inputs in $C (git-ignored, named in the call's `carry`): llama.cpp.tar.xz (llama-cpp-python 0.3.36's vendor/llama.cpp
# without models/, docs/, media/, benches/, tests/, examples/, pocs/, tools/ui, tools/server and the non-CPU ggml
# backends: 3.8 MB; made from the sdist that eval/bench_cpu_llama.py downloads) and ref/ (refmoe-qwen3's tokenizer.json
# and tokenizer_config.json, which model (b) takes).
# Usage (repo root, on the device): OUT=<dir> C=<inputs> bash eval/bench_cpu_device.sh [deadline_s] [plans] [gguf]
set -u
C=${C:-.gpu_carry/s24/amx}
OUT=${OUT:-/tmp/amx-out}
DEADLINE=${1:-340}
PLANS=${2:-4,2,8,3,mixed}
GGUF=${3:-Q4_0,Q2_K,Q8_0,Q3_K_M,Q4_K_M}
mkdir -p "$OUT" /tmp/amx-logs
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
lim() { local l=$(( $(left) - $1 )); [ $l -lt 5 ] && l=5; echo $l; }  # seconds left less $1, at least 5
waitfor() { while kill -0 $1 2>/dev/null && [ $(left) -gt $2 ]; do sleep 1; done; wait $1 2>/dev/null; }  # pid, stop at $2 s left
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=python3
W=/tmp/bench-cpu
LL=/tmp/llama

# 1. the CPU
{ lscpu; echo; lscpu -p=CPU,CORE,SOCKET,NODE; echo; grep -m1 '^flags' /proc/cpuinfo; free -g; uname -a; } > "$OUT/cpu.txt" 2>&1
grep -m1 'model name' /proc/cpuinfo; nproc
for f in amx_tile amx_int8 amx_bf16 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512vbmi avx_vnni avx512_fp16; do
  printf '%s=%s ' $f "$(grep -qw $f /proc/cpuinfo && echo y || echo n)"; done; echo
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cpu capability', torch.backends.cpu.get_cpu_capability())"
g++ --version | head -1; cmake --version | head -1

# 2. background: llama.cpp (trimmed source, built with -march=native); model (b), then each plan's export in its own
#    process and the bf16 GGUF (llama.cpp's converter needs no binaries)
( mkdir -p $LL && tar xJf $C/llama.cpp.tar.xz -C $LL && touch $LL/unpacked &&
  nice -n 5 $PY eval/bench_cpu_llama.py --build-only --llama-dir $LL --jobs 7 ) > /tmp/amx-logs/llama_build.out 2>&1 &
LPID=$!
PREP="--models b --no-llama --prepare-only --ref-model $C/ref --workdir $W"
( OMP_NUM_THREADS=8 $PY eval/bench_cpu.py $PREP --plans "" && el "model b built" &&
  for p in ${PLANS//,/ }; do OMP_NUM_THREADS=2 $PY eval/bench_cpu.py $PREP --plans $p > /tmp/amx-logs/prep_$p.out 2>&1 & done &&
  while [ ! -f $LL/unpacked ]; do sleep 1; done && ( cd eval && $PY -c "import bench_cpu_llama as l; from pathlib import Path as P
l.convert(l.LlamaCpp(P('$LL/llama_cpp_python-0.3.36/vendor/llama.cpp'), P('$LL/build/bin')), P('$W/b-bf16'), P('$W/b-gguf'), [])" ) &&
  el "bf16 gguf written" && wait ) > /tmp/amx-logs/prep_b.out 2>&1 &
BPID=$!

# 3. our C++ modules (the low-bit one, and the -march=native one with the AMX kernels), then the kernel paths
el "building the C++ modules"
( MAX_JOBS=8 $PY -c "from moecompress.runtime.kernels import cpu_lowbit; print('lowbit', cpu_lowbit.available())" ) \
  > /tmp/amx-logs/build_lowbit.out 2>&1 &
K1=$!
MAX_JOBS=8 $PY -c "from moecompress.runtime.kernels import cpu_kernels; print('cpu_kernels', cpu_kernels.available(), 'amx', cpu_kernels.amx())" 2>&1 | tail -3
wait $K1; tail -3 /tmp/amx-logs/build_lowbit.out
el "C++ modules done"
$PY eval/cpu_paths.py 2>&1 | tail -20

# 4. the CPU kernel tests
el "tests"
TESTS="tests/test_runtime_kernels.py tests/test_cpu_kernels.py tests/test_cpu_moe.py tests/test_cpu_prefill.py tests/test_cpu_step.py tests/test_cpu_attention.py"
OMP_NUM_THREADS=2 timeout 170 $PY -m pytest -q -n 8 -p no:cacheprovider -rs --durations=12 $TESTS > "$OUT/tests.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
el "tests done"

# 5. conversion (needs the llama.cpp build and model b), then the benchmark on 2 physical cores of one socket
waitfor $LPID 60; echo "llama build rc=$?"; tail -2 /tmp/amx-logs/llama_build.out
waitfor $BPID 60; echo "prep b rc=$?"; tail -2 /tmp/amx-logs/prep_b.out
el "converting"
timeout $(lim 60) $PY eval/bench_cpu.py --models b --plans "$PLANS" --gguf "$GGUF" --prepare-only \
  --ref-model $C/ref --workdir $W --llama-dir $LL --jobs 14 > /tmp/amx-logs/convert.out 2>&1
echo "convert rc=$?"; tail -2 /tmp/amx-logs/convert.out
CORES=$(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '$3==0 && !seen[$2]++ {print $1}' | head -2 | paste -sd,)
ISA2=$($PY -c "from moecompress.runtime.kernels import cpu_features as c; f = c.detect(); b = c.best_isa(); o = c.ISA_ORDER
print(next(i for i in o[o.index(b) + 1:] if f.has(i)))")
el "benchmark on CPUs $CORES, $(left) s left (the last 50 for the A/B on $ISA2)"
timeout $(lim 50) taskset -c "$CORES" $PY eval/bench_cpu.py --models b --plans "$PLANS" --gguf "$GGUF" \
  --rounds 1 --threads 2 --ref-model $C/ref --workdir $W --llama-dir $LL --out "$OUT/cpu_b.md" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"
# A/B where time is left: plan 4 of ours on the next ISA down (AMX CPUs: 4-bit stays packed, VNNI decode + tiles)
if [ "$(left)" -gt 30 ]; then
  el "A/B: ours plan 4 with MOECOMPRESS_CPU_ISA=$ISA2, $(left) s left"
  MOECOMPRESS_CPU_ISA=$ISA2 timeout $(lim 3) taskset -c "$CORES" $PY eval/bench_cpu.py --models b --plans 4 --no-llama \
    --rounds 1 --threads 2 --ref-model $C/ref --workdir $W --out "$OUT/cpu_b_isa2.md" > /tmp/amx-logs/bench_isa2.txt 2>&1
  echo "A/B rc=$?"; grep -A4 "^| engine\|^| model" "$OUT/cpu_b_isa2.md" 2>/dev/null | head -8
fi
el "done"
cp "$OUT/bench.txt" /tmp/amx-logs/ 2>/dev/null; rm -f "$OUT/bench.txt"
cp $W/b-gguf/convert.log /tmp/amx-logs/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp/amx-logs .
cat "$OUT/cpu_b.md" 2>/dev/null | tail -22
