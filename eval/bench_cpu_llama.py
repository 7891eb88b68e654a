"""llama.cpp as the bar for eval/bench_cpu.py: build it from its source package, convert HF models to GGUF, quantize,
and run llama-bench with its process RSS.

llama.cpp's source ships inside the PyPI sdist of llama-cpp-python (vendor/llama.cpp), together with its own gguf-py and
convert_hf_to_gguf.py; the build is CPU only (-DGGML_NATIVE=ON) and cached under --llama-dir.

    .venv/bin/python eval/bench_cpu_llama.py --build-only          # download + build (slow on 2 cores), then exit
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_DIR = Path.home() / ".cache" / "moecompress" / "llama.cpp"
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
TOOLS = ("llama-bench", "llama-quantize", "llama-batched-bench")
# A build for AVX2-only x86 CPUs (AMD EPYC Zen 1-3, Haswell .. Cascade Lake without AVX-512), also on a CPU that has
# AVX-512 / AMX: how this box stands in for one (--cmake-flags avx2 here, --llama-cmake avx2 in bench_cpu.py).
AVX2_ONLY_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                   "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
                   "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                   "-DGGML_AMX_BF16=OFF")


def cmake_flags(value: str) -> tuple[str, ...]:
    """--cmake-flags / --llama-cmake: "" (the native build), "avx2" (AVX2_ONLY_FLAGS) or flags separated by spaces."""
    return AVX2_ONLY_FLAGS if value == "avx2" else tuple(value.split())


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # vendor/llama.cpp
    bin: Path  # holds llama-bench, llama-quantize

    def tool(self, name: str) -> Path:
        return self.bin / name


def _run(cmd: list, log: Path, **kw) -> None:
    print("  $", " ".join(str(c) for c in cmd if "\n" not in str(c)), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")


def ensure_built(root: Path, version: str = LLAMA_CPP_PYTHON, jobs: int = 2, cmake_flags: tuple[str, ...] = ()) -> LlamaCpp:
    """Download the llama-cpp-python sdist, unpack it and build llama-bench + llama-quantize (each step skipped when
    its output exists). `cmake_flags` come after ours (a later -D wins: e.g. AVX2_ONLY_FLAGS for a build without
    AVX-512 / AMX) and build into their own folder, build-<hash of the flags>."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    source = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = root / ("build" if not cmake_flags else
                    "build-" + hashlib.sha256(" ".join(cmake_flags).encode()).hexdigest()[:8])
    lib = LlamaCpp(source, build / "bin")
    if all(lib.tool(t).exists() for t in TOOLS):
        return lib
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists() and not (source / "CMakeLists.txt").exists():  # an unpacked source tree needs no sdist
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", root], log)
    if not (source / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    _run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
          "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", *cmake_flags], log)
    _run(["cmake", "--build", build, "--config", "Release", "-j", str(jobs), "--target", *TOOLS], log)
    return lib


# -- converting -------------------------------------------------------------------------------------------------------
# convert_hf_to_gguf.py knows pre-tokenizers by the hash of their output on a test text and refuses others. Our models'
# tokenizer (refmoe-qwen3's, also given to the random-init model) is a byte-level BPE with the GPT-2 split regex
# (pre_tokenizer ByteLevel, use_regex=True), which is llama.cpp's "gpt-2" pre-tokenizer: name it so when the hash is
# unknown. The tokenizer does not enter the timings.
_CONVERT = """
import runpy, sys
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def convert(lib: LlamaCpp, hf_dir: Path, out_dir: Path, types=GGUF_TYPES, log: Path | None = None,
            threads: int = 2) -> dict[str, Path]:
    """HF checkpoint -> bf16 GGUF (llama.cpp's own convert_hf_to_gguf.py and gguf-py) -> llama-quantize per type
    (`threads` threads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or out_dir / "convert.log"
    files = {"bf16": out_dir / "model-bf16.gguf"}
    if not files["bf16"].exists():  # each file written under a temporary name, renamed when complete
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib.source), str(lib.source / "gguf-py")]),
               "HF_HUB_OFFLINE": "1"}
        _run([sys.executable, "-c", _CONVERT, lib.source / "convert_hf_to_gguf.py", hf_dir, "--outtype", "bf16",
              "--outfile", files["bf16"].with_suffix(".part")], log, env=env)
        files["bf16"].with_suffix(".part").rename(files["bf16"])
    for t in types:
        files[t] = out_dir / f"model-{t}.gguf"
        if not files[t].exists():
            _run([lib.tool("llama-quantize"), files["bf16"], files[t].with_suffix(".part"), t, threads], log)
            files[t].with_suffix(".part").rename(files[t])
    return files


# -- benchmarking -----------------------------------------------------------------------------------------------------
def _poll_rss(pid: int, peak: dict, stop: threading.Event) -> None:
    """Track the largest VmRSS / VmHWM of a running process."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                key = line.split(":")[0]
                if key in ("VmRSS", "VmHWM"):
                    peak[key] = max(peak.get(key, 0), int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.05)


def _watched(cmd: list) -> tuple[str, int]:
    """Run a tool to the end: its stdout and its peak RSS (polled from /proc)."""
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_rss, args=(proc.pid, peak, stop), daemon=True)
    poller.start()
    out, err = proc.communicate()
    stop.set()
    poller.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): {err[-2000:]}")
    return out, max(peak.values(), default=0)


def llama_bench(lib: LlamaCpp, gguf: Path, threads: int, prompt: int, gen: int) -> dict:
    """One llama-bench run (one repetition): prompt processing (`prompt` tokens, batch 1) and, when `gen`, token
    generation from an empty context; tokens/s and the process's peak RSS."""
    cmd = [lib.tool("llama-bench"), "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", 1, "-o", "json"]
    out, peak = _watched(cmd)
    result = {"rss_peak_bench": peak}
    for rec in json.loads(out):
        result["prefill" if rec["n_prompt"] else "decode_empty"] = rec["avg_ts"]
    return result


def batched_bench(lib: LlamaCpp, gguf: Path, threads: int, prompt: int, gen: int, batches: list[int]) -> dict:
    """llama-batched-bench: `gen` tokens generated one step at a time for each of `b` parallel sequences after a
    `prompt`-token prompt each (KV cache); tokens/s of the generation steps, and the process's peak RSS."""
    ctx = max(batches) * (prompt + gen) + 16
    cmd = [lib.tool("llama-batched-bench"), "-m", gguf, "-t", threads, "-tb", threads, "-c", ctx, "-b", 2048,
           "-ub", 512, "-npp", prompt, "-ntg", gen, "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    out, peak = _watched(cmd)
    result = {"rss_peak": peak}
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            result[f"decode_b{rec['pl']}"] = rec["speed_tg"]
    missing = [b for b in batches if f"decode_b{b}" not in result]
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no result for batch {missing}: {out[-1000:]}")
    return result


def file_bytes(gguf: Path) -> int:
    return gguf.stat().st_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cmake-flags", default="", type=cmake_flags,
                    help='extra cmake flags ("avx2": an AVX2-only build, no AVX-512 / AMX), their own build folder')
    args = ap.parse_args(argv)
    t0 = time.time()
    lib = ensure_built(args.llama_dir, jobs=args.jobs, cmake_flags=args.cmake_flags)
    print(f"built {lib.bin} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
