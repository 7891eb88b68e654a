"""CPU benchmark against llama.cpp: true token-by-token generation, prefill, process RSS and the bandwidth bound.

Models: (a) ../shared/models/refmoe-qwen3, (b) a random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dimensions (hidden
2048, 128 experts of width 768, top-8, 2 layers, 32k vocab; refmoe-qwen3's tokenizer so that llama.cpp converts it).
Ours: bf16, and RTN at uniform 8/4/3/2 expert bits and a mixed plan (dense linears: see `plan_for`). llama.cpp: the
same bf16 weights converted with its own convert_hf_to_gguf.py, quantized to Q8_0/Q4_0/Q4_K_M/Q3_K_M/Q2_K
(eval/bench_cpu_llama.py builds it from the llama-cpp-python sdist).

Every configuration runs in a fresh process (RSS is per process), configurations interleaved over --rounds rounds;
medians. Ours: prefill = the median of 3 512-token forwards (logits of the last token); decode = 64 greedy tokens one
at a time with the KV cache after a 128-token prompt, batch 1 and 4 (only the 64 steps timed). llama.cpp:
llama-bench -p 512 (prefill) and llama-batched-bench -npp 128 -ntg 64 -npl 1,4 (decode after the same prompt).

    .venv/bin/python eval/bench_cpu.py                                   # everything (~8 min on an idle 2-core box)
    .venv/bin/python eval/bench_cpu.py --models b --plans bf16,4 --gguf Q4_0 --rounds 1
    .venv/bin/python eval/bench_cpu.py --models b --plans 4 --no-llama --rounds 1   # ours only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import bench_cpu_llama as llama
import bench_cpu_probe as probe
import bench_runtime as rt
from bench_cpu_report import active_bytes_gguf, active_bytes_hf, cpu_info, write_report
from bench_cpu_rss import mappings, rss_parts

REPO = Path(__file__).resolve().parents[1]
PLANS = ("bf16", "8", "4", "3", "2", "mixed")
# The GGUF type each of our plans is compared with (decode goal: ours >= llama.cpp at the matching type).
MATCH = {"bf16": "bf16", "8": "Q8_0", "4": "Q4_0", "3": "Q3_K_M", "2": "Q2_K"}
GROUP_SIZE = {"a": 64, "b": 128}
# --avx2-only: ours as on an AVX2-only CPU (AMD EPYC Zen 1-3), emulated on a CPU with AVX-512 / AMX: our kernels forced
# to AVX2, torch's own kernels (ATen), oneDNN and MKL capped at AVX2; llama.cpp built without AVX-512 / AMX
# (bench_cpu_llama.AVX2_ONLY_FLAGS). An emulation: the same core, caches and memory as the native rows.
AVX2_ENV = {"MOECOMPRESS_CPU_ISA": "cpu:avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
EMULATION = ("**Emulated AVX2-only CPU** (--avx2-only): ours with " + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
             + ", llama.cpp built without AVX-512 / AMX (bench_cpu_llama.AVX2_ONLY_FLAGS); the flags above are the "
             "host's. Same cores, caches and memory as a native run: not a measurement on an AVX2-only CPU.")
PREFILL_REPEATS = 3  # 512-token forwards of ours per configuration and round (median)


# -- models and checkpoints -------------------------------------------------------------------------------------------
def build_model_b(out: Path, ref: Path, vocab: int) -> None:
    """Random-init Qwen3-30B-A3B MoE dims (bench_runtime.build_random_30b_dims), with refmoe-qwen3's tokenizer."""
    if (out / "config.json").exists():
        return
    print("[b] building the random-init model", flush=True)
    rt.build_random_30b_dims(out, vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ref / name, out / name)


def plan_for(layout, name: str, group_size: int, dense_bits: str, head_bits: str = "16"):
    """rt.plan_for's expert bits, plus the attention linears quantized as llama.cpp's types do (its Q4_0..Q2_K keep
    3-6 bits there, Q8_0 8): 8 bits for plan 8, else 4; `dense_bits="16"` keeps them bf16. lm_head stays bf16 unless
    `head_bits` says otherwise (llama.cpp stores it at Q6_K, or Q8_0 for Q8_0; only for untied embeddings)."""
    plan = rt.plan_for(layout, name, group_size)
    linears = {}
    if dense_bits != "16":
        bits = 8 if name == "8" else 4 if dense_bits == "match" else int(dense_bits)
        linears = {p: bits for p in layout.attention_linears}
    if head_bits != "16":
        linears["lm_head"] = int(head_bits)
    return replace(plan, linears=linears) if linears else plan


def export_plans(bf16_dir: Path, work: Path, key: str, plans, group_size: int, dense_bits: str,
                 head_bits: str = "16") -> dict[str, Path]:
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.arch.adapters import describe
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    head = "" if head_bits == "16" else f"-head{head_bits}"
    dirs = {p: work / f"{key}-{p}-dense{dense_bits}{head}" for p in plans}
    todo = [p for p in plans if not (dirs[p] / "config.json").exists()]
    if todo:
        model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
        layout = describe(model)
        for p in todo:
            print(f"[{key}] quantize + export plan {p}", flush=True)
            plan = plan_for(layout, p, group_size, dense_bits, head_bits)
            options = QuantizeOptions(method="rtn", clip="minmax")  # random weights: the range search buys nothing
            quantized = quantize_model(model, layout, plan, None, options, progress=False)
            export_checkpoint(model, layout, plan, quantized, dirs[p], overwrite=True)
            del quantized
            gc.collect()
    return dirs


# -- ours: one configuration in this (fresh) process ------------------------------------------------------------------
def measure_ours(directory: Path, threads: int, prefill: int, prompt: int, gen: int, batches: list[int],
                 decoder: str = "step") -> dict:
    """decoder "step": decode with CpuDecoder (the whole-model C++ step, runtime/cpu_step/); "transformers": one
    transformers forward per token (the engine ours-transformers)."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    import moecompress  # noqa: F401  (imported before the baseline RSS)
    from moecompress.runtime.experts.cpu_prefill16 import Gemm16Prefill

    with torch.device("meta"):  # page in the modeling code first: library memory is not model memory
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    base, lib_base = rt.vm_kib("VmRSS") * 1024, shared_library_rss()
    t0 = time.perf_counter()
    model = rt.load(directory).eval()
    load_s = time.perf_counter() - t0
    out = {"rss_base": base, "rss_load": rt.vm_kib("VmRSS") * 1024, "hwm_load": rt.vm_kib("VmHWM") * 1024,
           "rss_anon_load": rt.vm_kib("RssAnon") * 1024, "rss_file_load": rt.vm_kib("RssFile") * 1024,
           "load_s": load_s}
    vocab = model.config.vocab_size
    gen_ids = torch.Generator().manual_seed(0)
    if decoder == "step":  # models the step does not run decode through transformers (the reason kept)
        from moecompress.runtime.cpu_step import StepPlan, UnsupportedModel

        try:
            StepPlan.of(model)
        except UnsupportedModel as exc:
            decoder = f"transformers ({exc})"
    generate = _step_generate if decoder == "step" else _generate
    out["decoder"] = decoder
    with torch.no_grad():  # as model.generate does
        generate(model, torch.randint(0, vocab, (1, 32), generator=gen_ids), 4)  # warm-up (kernels, allocator)
        ids = torch.randint(0, vocab, (1, prefill), generator=gen_ids)
        times = []
        with Gemm16Prefill(model) as switched:  # what CpuDecoder.prefill runs its forward in
            for _ in range(PREFILL_REPEATS):  # the median of a few forwards (llama-bench averages 5 repetitions)
                t0 = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        out["prefill_gemm16"] = {"isa": switched.isa, "experts": switched.experts, "linears": switched.linears}
        out["prefill"] = prefill / statistics.median(times)
        for b in batches:
            secs = generate(model, torch.randint(0, vocab, (b, prompt), generator=gen_ids), gen)
            out[f"decode_b{b}"] = b * gen / secs
    out["hwm_end"] = rt.vm_kib("VmHWM") * 1024
    out["rss_end"] = rt.vm_kib("VmRSS") * 1024
    out["rss_libs_added"] = shared_library_rss() - lib_base
    out.update(rss_parts(model, directory, out["rss_end"] - base - out["rss_libs_added"]))  # trims: after the above
    return out


def shared_library_rss() -> int:
    """Resident bytes of this process's mappings of shared libraries (.so): code, not model memory (the C++ kernel
    modules load after the baseline)."""
    return sum(rss for _, _, path, rss in mappings() if ".so" in path)


def _generate(model, prompt_ids, gen: int) -> float:
    """Greedy generation, one token per forward with the KV cache; seconds of the `gen` decode steps."""
    import torch

    out = model(prompt_ids, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(gen):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cpu.synchronize() if hasattr(torch, "cpu") else None
    return time.perf_counter() - t0


def _step_generate(model, prompt_ids, gen: int) -> float:
    """As `_generate`, the decode steps through CpuDecoder (all `gen` steps one C++ call, as its generate runs them;
    the prompt through the model's forward, not timed); seconds of the `gen` decode steps."""
    import torch

    from moecompress.runtime.cpu_step import CpuDecoder

    batch, n = prompt_ids.shape
    decoder = CpuDecoder(model, n + gen + 1, batch)
    logits, positions = decoder.prefill(prompt_ids, torch.ones_like(prompt_ids))
    nxt, position = logits.argmax(-1), positions[:, -1] + 1
    t0 = time.perf_counter()
    decoder.greedy_steps(nxt, position, n, gen)  # gen greedy steps in one C++ call, as CpuDecoder.generate runs them
    return time.perf_counter() - t0


def ours_subprocess(directory: Path, args, fused: bool = True, decoder: str = "step") -> dict:
    cmd = [sys.executable, __file__, "--measure", str(directory), "--threads", str(args.threads), "--prefill",
           str(args.prefill), "--prompt", str(args.prompt), "--gen", str(args.gen), "--batches",
           ",".join(map(str, args.batches)), "--decoder", decoder]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(AVX2_ENV if args.avx2_only else {})}
    if not fused:  # PackedExperts' general path at decode too (runtime/experts/cpu_moe.py)
        env["MOECOMPRESS_CPU_FUSED_TOKENS"] = "0"
        env["MOECOMPRESS_CPU_PREFILL_FUSED"] = "0"  # nor the fused prefill call (experts/cpu_prefill.py)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"measuring {directory} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE_VARIANTS = ("stream,1,0", "stream,1,2048", "decode,1,2048")  # bench_cpu_probe: pattern, 2 MB pages, prefetch


def measure_bandwidth(threads: int) -> dict:
    """One reading of the machine's read bandwidth (bytes/s), each variant in a fresh process: eval/bench_cpu_probe.py's
    2-thread reads on 2 MB pages (a plain stream with and without software prefetch, and the decode's pattern: 8
    scattered expert-sized matrices per parallel loop), each the median of 5 passes over 1 GiB; the reading is the
    fastest variant's median (what the best reader does now). Session 24's torch float32 sum (best of 7, 4 KB and 2 MB
    pages) is kept beside it for comparison; off x86 it is the reading."""
    print(f"read bandwidth ({threads} threads) ...", flush=True)
    out = {"variants": [], "torch_sum": []}

    def child(*extra, env=None):
        text = subprocess.run([sys.executable, *extra, "--threads", str(threads)], capture_output=True, text=True,
                              check=True, env=env).stdout
        return json.loads(text.strip().splitlines()[-1])

    for thp in ("0", "1"):
        out["torch_sum"].append(child(__file__, "--bandwidth", env={**os.environ, "THP_MEM_ALLOC_ENABLE": thp}))
    if probe.available():
        out["variants"] = [child(probe.__file__, "--variant", v) for v in PROBE_VARIANTS]
        out["reading"] = max(v["median"] for v in out["variants"])
    else:
        out["reading"] = max(out["torch_sum"])
    return out


def _bandwidth(result: dict, probes: list[dict]) -> None:
    """The bound's bandwidth: the median of the run's readings (a reading swings with the machine's state; the
    decode speeds are medians too). The old rule's value (the highest torch-sum reading) stays in the JSON."""
    readings = [p["reading"] for p in probes]
    result.update(bandwidth=statistics.median(readings), bandwidth_readings=readings, bandwidth_probes=probes,
                  bandwidth_torch_sum_max=max(x for p in probes for x in p["torch_sum"]))


# -- orchestration ----------------------------------------------------------------------------------------------------
def prepare(args) -> tuple[list[tuple], object]:
    """Build, export and convert; the configurations (model key, engine, plan or GGUF type, path), each of our
    plans followed by its matching llama.cpp type, so that a cut-short run still compares pairs."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ref = (REPO / args.ref_model).resolve()
    flags = llama.AVX2_ONLY_FLAGS if args.avx2_only else llama.cmake_flags(args.llama_cmake)
    lib = None if args.no_llama else llama.ensure_built(Path(args.llama_dir), jobs=args.jobs, cmake_flags=flags)
    configs = []
    for key in args.models:
        bf16_dir = ref if key == "a" else work / "b-bf16"
        if key == "b":
            build_model_b(bf16_dir, ref, args.vocab_b)
        quant = [p for p in args.plans if p != "bf16"]
        dirs = {"bf16": bf16_dir} if "bf16" in args.plans else {}
        head = args.head_bits if key == "b" else "16"  # model (a) ties lm_head to the embeddings
        dirs.update(export_plans(bf16_dir, work, key, quant, GROUP_SIZE[key], args.dense_bits, head))
        ggufs = {} if lib is None else llama.convert(lib, bf16_dir, work / f"{key}-gguf",
                                                     [t for t in args.gguf if t != "bf16"], threads=args.jobs)
        ggufs = {t: ggufs[t] for t in [*([] if args.skip_gguf_bf16 else ["bf16"]), *args.gguf] if t in ggufs}
        for p, d in dirs.items():
            configs.append((key, "ours", p, d, bf16_dir))
            if args.ours_transformers:
                configs.append((key, "ours-transformers", p, d, bf16_dir))
            if args.compare_fused and p != "bf16":
                configs.append((key, "ours-unfused", p, d, bf16_dir))
            if MATCH.get(p) in ggufs:
                configs.append((key, "llama.cpp", MATCH[p], ggufs.pop(MATCH[p]), bf16_dir))
        configs += [(key, "llama.cpp", t, g, bf16_dir) for t, g in ggufs.items()]
    return configs, lib


def run(args, configs, lib, report) -> dict:
    """Measure every configuration `args.rounds` times, interleaved; `report(result)` after each measurement."""
    probes = [measure_bandwidth(args.threads)]
    samples: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    static = {}
    for i, (key, engine, plan, path, hf_dir) in enumerate(configs):
        static[i] = {"model": key, "engine": engine, "plan": plan, "path": str(path)}
        if engine == "llama.cpp":
            static[i].update(bytes=llama.file_bytes(path),
                             active=active_bytes_gguf(path, args.batches, hf_dir, lib.source / "gguf-py"))
        else:
            static[i].update(bytes=rt.disk_bytes(path), active=active_bytes_hf(path, args.batches))
    result = {"rows": [], "cpu": cpu_info(), "match": MATCH}
    _bandwidth(result, probes)
    for r in range(args.rounds):
        if r:  # a reading before each round and one at the end
            probes.append(measure_bandwidth(args.threads))
            _bandwidth(result, probes)
        for i, (key, engine, plan, path, _) in enumerate(configs):
            print(f"round {r + 1}/{args.rounds}: [{key}] {engine} {plan}", flush=True)
            try:
                if engine.startswith("ours"):
                    decoder = "step" if engine == "ours" else "transformers"
                    samples[i].append(ours_subprocess(path, args, fused=engine != "ours-unfused", decoder=decoder))
                else:
                    res = llama.llama_bench(lib, path, args.threads, args.prefill, args.gen)
                    res.update(llama.batched_bench(lib, path, args.threads, args.prompt, args.gen, args.batches))
                    samples[i].append(res)
            except RuntimeError as exc:  # one broken configuration does not stop the others
                print(f"  failed: {exc}", flush=True)
                static[i].setdefault("errors", []).append(str(exc)[-1500:])
            result["rows"] = [_row(static[k], samples[k], r + 1) for k in static if samples[k]]
            report(result)
    probes.append(measure_bandwidth(args.threads))
    _bandwidth(result, probes)
    report(result)
    return result


def _row(static: dict, samples: list[dict], rounds: int) -> dict:
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    return {**static, **{k: statistics.median(s[k] for s in samples) for k in keys}, "samples": samples,
            "rounds_done": rounds}


def parse_args(argv=None):
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="b,a", type=csv, help="which of a (refmoe-qwen3), b (30B-A3B dims)")
    ap.add_argument("--plans", default=",".join(PLANS), type=csv, help=f"ours, of {','.join(PLANS)}")
    ap.add_argument("--gguf", default=",".join(llama.GGUF_TYPES), type=csv,
                    help="llama.cpp types (bf16 too, unless --skip-gguf-bf16)")
    ap.add_argument("--dense-bits", default="match", choices=("match", "16", "8", "4"),
                    help="bits of the attention linears in our quantized plans (match: 8 for plan 8, else 4)")
    ap.add_argument("--head-bits", default="8", choices=("16", "8", "4"),
                    help="bits of lm_head in our quantized plans of model (b) (default 8, as close as our widths come "
                         "to llama.cpp's: it stores the output matrix at Q6_K, Q8_0 in Q8_0 files; 16: bf16)")
    ap.add_argument("--no-llama", action="store_true", help="ours only")
    ap.add_argument("--skip-gguf-bf16", action="store_true",
                    help="convert llama.cpp's bf16 GGUF (the types' source) but do not measure it")
    ap.add_argument("--compare-fused", action="store_true",
                    help="also run each quantized plan of ours without the fused MoE decode and prefill calls (engine "
                         "ours-unfused)")
    ap.add_argument("--ours-transformers", action="store_true",
                    help="also decode each quantized plan of ours with one transformers forward per token (engine "
                         "ours-transformers; engine ours decodes with the whole-model C++ step, CpuDecoder)")
    ap.add_argument("--decoder", default="step", choices=("step", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", action="store_true", help="build, export and convert the models, then stop")
    ap.add_argument("--llama-dir", default=str(llama.DEFAULT_DIR), help="llama.cpp source + build cache")
    ap.add_argument("--llama-cmake", default="", help='extra cmake flags for llama.cpp ("avx2": without AVX-512 / AMX), '
                    "built in their own folder")
    ap.add_argument("--avx2-only", action="store_true",
                    help="emulate an AVX2-only CPU: ours under AVX2_ENV, llama.cpp built with --llama-cmake avx2")
    ap.add_argument("--jobs", type=int, default=2, help="threads that build llama.cpp and run llama-quantize (not the "
                    "timed runs)")
    ap.add_argument("--ref-model", default="../shared/models/refmoe-qwen3", help="model (a), relative to the repo")
    ap.add_argument("--vocab-b", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--batches", default="1,4", type=lambda s: [int(x) for x in csv(s)])
    ap.add_argument("--workdir", default="/tmp/moecompress-bench-cpu", help="checkpoints are kept here and reused")
    ap.add_argument("--out", default="eval/results/cpu.md")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_ours(Path(args.measure), args.threads, args.prefill, args.prompt, args.gen,
                                      args.batches, args.decoder)))
        return
    if args.bandwidth:
        print(json.dumps(probe.torch_sum(args.threads)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs, lib = prepare(args)
    if args.prepare_only:
        return
    t0, load0 = time.time(), os.getloadavg()[0]
    command = "python eval/bench_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def report(result: dict) -> str:
        if args.avx2_only:
            result["emulation"] = EMULATION
        result.update(command=command, head_bits=args.head_bits, wall_s=time.time() - t0, load=(load0, os.getloadavg()[0]),
                      threads=args.threads, shapes={"prefill": args.prefill, "prompt": args.prompt, "gen": args.gen,
                                                    "batches": args.batches})
        return write_report(result, REPO / args.out)

    print(report(run(args, configs, lib, report)))


if __name__ == "__main__":
    main()
