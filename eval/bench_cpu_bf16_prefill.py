"""Where a bf16 model's 512-token prefill spends its CPU time, by part (experts, router, q/k/v/o, attention core,
norms, lm_head, embedding), with torch's bf16 ops and with the C++ GEMM (runtime/experts/cpu_prefill16.py).

One thread: each part's CPU time is the calling thread's (time.thread_time) between forward pre- and post-hooks of
its modules; "attention core" is self_attn's time less its projections and q/k norms (RoPE, sdpa, reshapes); "other"
the forward's total less all parts (residual adds, the decoder layers' glue). The forward is what eval/bench_cpu.py
times: model(ids, use_cache=True, logits_to_keep=1), so lm_head sees one row. Variants run interleaved, medians of
--repeats forwards per round.

    MOECOMPRESS_CPU_ISA=cpu:avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        .venv/bin/python eval/bench_cpu_bf16_prefill.py --models a,b --variants torch,gemm16-experts,gemm16 --out parts.json

(session 28's two runs, emulated AVX2 and native, are in eval/results/cpu_bf16_avx2_s28.json: parts_avx2, parts_native).
Model (b) is the one eval/bench_cpu.py builds (--prepare-only) under its default --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {"a": REPO / "../shared/models/refmoe-qwen3", "b": Path("/tmp/moecompress-bench-cpu/b-bf16")}
PARTS = {"experts": ("mlp.experts",), "router": ("mlp.gate",), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
         "norms": ("input_layernorm", "post_attention_layernorm", "model.norm"), "qk_norms": ("q_norm", "k_norm"),
         "lm_head": ("lm_head",), "embed": ("embed_tokens",), "self_attn": ("self_attn",)}


def part_of(name: str) -> str | None:
    for part, suffixes in PARTS.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return part
    return None


def timed_forward(model, ids, parts: dict) -> float:
    """One forward; adds each part's thread CPU time to `parts`; returns the forward's."""
    handles, starts = [], {}
    for name, module in model.named_modules():
        part = part_of(name)
        if part is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.thread_time())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name, p=part: parts.__setitem__(p, parts[p] + time.thread_time() - starts[n])))
    try:
        t0 = time.thread_time()
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)
        return time.thread_time() - t0
    finally:
        for h in handles:
            h.remove()


def measure(model, tokens: int, repeats: int, variant: str) -> dict:
    from moecompress.runtime.experts.cpu_prefill16 import Gemm16Prefill

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    block = {"torch": nullcontext(), "gemm16": Gemm16Prefill(model), "gemm16-experts": Gemm16Prefill(model, dense=False)}
    samples = []
    with block[variant] as b:
        for _ in range(repeats):
            parts = defaultdict(float)
            total = timed_forward(model, ids, parts)
            parts["attention core"] = parts.pop("self_attn", 0.0) - parts["qkvo"] - parts["qk_norms"]
            parts["other"] = total - sum(parts.values())
            samples.append({"total": total, **parts})
        switched = {} if variant == "torch" else {"experts_switched": int(b.experts), "linears_switched": int(b.linears)}
    out = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {**out, **switched}


KERNEL_SHAPES = ((512, 256, 256), (128, 256, 256), (512, 4096, 2048), (32, 1536, 2048), (32, 2048, 768))  # M, n, k


def kernels(isa: str) -> list[dict]:
    """GFLOP/s (CPU time, best of 5) of x float32 [M, k] @ W^T for W bf16 [n, k]: linear16, torch's bf16 matmul (x in
    bf16), torch's float32 matmul with W already float32 (a float32 copy of the model: what the GEMM avoids)."""
    from moecompress.runtime.kernels import cpu_lowbit

    def best(f):
        f()
        times = []
        for _ in range(5):
            t0 = time.process_time()
            f()
            times.append(time.process_time() - t0)
        return min(times)

    rows = []
    for M, n, k in KERNEL_SHAPES:
        x, w = torch.randn(M, k), torch.randn(n, k).bfloat16()
        xb, wf = x.bfloat16(), w.float()
        flop = 2 * M * n * k / 1e9
        row = {"shape": [M, n, k], "linear16": flop / best(lambda: cpu_lowbit.linear16(x, w, isa)),
               "torch_bf16": flop / best(lambda: xb @ w.T), "torch_f32": flop / best(lambda: x @ wf.T)}
        print(f"M {M:4d} n {n:5d} k {k:5d}: GFLOP/s linear16 {row['linear16']:6.1f}  torch bf16 {row['torch_bf16']:6.1f}  "
              f"torch f32 (W float32) {row['torch_f32']:6.1f}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="a,b")
    ap.add_argument("--variants", default="torch,gemm16")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", action="store_true", help="only the GEMM against torch's matmuls (KERNEL_SHAPES)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kernels:
        from moecompress.runtime.experts.cpu_prefill16 import gemm16_isa

        isa = gemm16_isa() or "cpu:avx2"
        result = {"isa": isa, "threads": args.threads, "load_before": os.getloadavg(), "rows": kernels(isa),
                  "load_after": os.getloadavg()}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    from transformers import AutoModelForCausalLM

    env = {k: os.environ.get(k) for k in ("MOECOMPRESS_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                          "MKL_ENABLE_INSTRUCTIONS", "MOECOMPRESS_CPU_GEMM16")}
    result = {"env": env, "tokens": args.tokens, "threads": args.threads, "load_before": os.getloadavg(), "rows": []}
    models = {k: AutoModelForCausalLM.from_pretrained(MODELS[k], dtype=torch.bfloat16).eval() for k in args.models.split(",")}
    for key, model in models.items():  # warm-up: kernels, allocator
        measure(model, 64, 1, "torch"), measure(model, 64, 1, "gemm16")
    runs = defaultdict(list)
    for _ in range(args.rounds):
        for key, model in models.items():
            for variant in args.variants.split(","):
                runs[(key, variant)].append(measure(model, args.tokens, args.repeats, variant))
    for (key, variant), rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k] for k in rs[0]}
        row.update(model=key, variant=variant, tok_s=args.tokens / row["total"], rounds=[r["total"] for r in rs])
        result["rows"].append(row)
        parts = "  ".join(f"{k} {1e3 * v:.0f}" for k, v in row.items() if isinstance(v, float) and k != "tok_s")
        print(f"[{key}] {variant:15s} {row['tok_s']:7.0f} tok/s  ms: {parts}", flush=True)
    result["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
