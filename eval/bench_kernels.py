"""Micro-benchmark of the packed-expert CPU kernels at Qwen3-30B-A3B expert shapes: per-expert time and GB/s.

For each projection (gate_up: 2048 -> 1536, down: 768 -> 2048; group 128) a group of `--experts` random experts is
built (more weight bytes than the L3 cache, so weights stream from memory as in a model), and each call computes
`--hit` of them (8, like top-8 routing) with `rows` rows each. Reported: milliseconds per expert (median over
repeats) and the effective GB/s of weight bytes read (packed bytes of the hit experts / time). Baseline: bf16
matmuls over bf16 weights (what transformers computes for unquantized experts), one per expert.

    .venv/bin/python eval/bench_kernels.py                      # 2 threads, rows 1 and 4, every available path
    .venv/bin/python eval/bench_kernels.py --rows 1 4 16 64 --paths decode prefill
    .venv/bin/python eval/bench_kernels.py --layer --rows 1 4          # a whole MoE layer: fused call vs per group

--layer: one MoE layer of 128 experts (top-8, gate_up + SiLU gate + down, Qwen3-30B-A3B dims) for `rows` tokens,
ms per layer call: the fused decode call (runtime/experts/cpu_moe.py) against PackedExperts' general path (per-group
kernel calls with routing in Python), median and min over repeats (min: the least disturbed run on a shared box);
--cpu-time --threads 1 measures process CPU time instead, which other processes' scheduling does not inflate.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moecompress.format.pack import pack
from moecompress.runtime.kernels import cpu_features, cpu_int4, cpu_kernels, cpu_lowbit

SHAPES = {"gate_up": (2048, 1536), "down": (768, 2048)}  # (in, out)


def make(bits: int, n: int, in_f: int, out_f: int, group: int, gen: torch.Generator):
    q = torch.randint(0, 1 << bits, (n, out_f, in_f), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, out_f, in_f // group, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, out_f, in_f // group), generator=gen).to(torch.uint8)
    return pack(q, bits), scales, zeros


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer(bits: int, experts: int, group: int, gen: torch.Generator):
    """A PackedExperts layer at Qwen3-30B-A3B dims, all experts at `bits`, random packed weights, transformers' gate."""
    from torch import nn
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import _default_apply_gate

    from moecompress.format.spec import ExpertsSpec
    from moecompress.runtime.experts.packed_experts import PackedExperts

    class Template(nn.Module):
        has_gate, has_bias, has_post_expert_norm, _apply_gate = True, False, False, _default_apply_gate

        def __init__(self):
            super().__init__()
            self.act_fn = ACT2FN["silu"]

    (hidden, two_inter), inter = SHAPES["gate_up"], SHAPES["down"][0]
    spec = ExpertsSpec(experts, {p: {bits: tuple(range(experts))} for p in ("gate_up", "down")})
    mod = PackedExperts(Template(), [("gate_up", hidden, two_inter), ("down", inter, hidden)], spec, group, False)
    for proj in ("gate_up", "down"):
        for g in getattr(mod, proj).children():
            qw, sc, z = make(bits, experts, g.in_features, g.out_features, group, gen)
            g.qweight.copy_(qw), g.scales.copy_(sc), g.zeros.copy_(z)
    return mod


def layer_main(args) -> None:
    from moecompress.runtime.experts import cpu_moe

    gen = torch.Generator().manual_seed(0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"{'CPU time' if args.cpu_time else 'wall time'}, threads {args.threads}, best ISA {cpu_features.best_isa()}, MoE layer of {args.experts} experts, top-{args.hit}, "
          f"bf16 hidden, median (min) of {args.repeats}")
    print("| bits | tokens | fused ms | general ms | fused GB/s weights |")
    print("|---|---|---|---|---|")
    default = cpu_moe.FUSED_MAX_TOKENS
    for bits in args.bits:
        mod = layer(bits, args.experts, args.group, gen)
        for rows in args.rows:
            x = torch.randn(rows, SHAPES["gate_up"][0], generator=gen).to(torch.bfloat16)
            idx = torch.stack([torch.randperm(args.experts, generator=gen)[:args.hit] for _ in range(rows)])
            w = torch.rand(rows, args.hit, generator=gen).to(torch.bfloat16)
            res = {}
            for name, limit in (("fused", default), ("general", 0)):
                cpu_moe.FUSED_MAX_TOKENS = limit
                res[name] = timed_all(lambda: mod(x, idx, w), args.repeats, clock)
            cpu_moe.FUSED_MAX_TOKENS = default
            hit = len(set(idx.flatten().tolist()))
            nbytes = sum(b.numel() * b.element_size() for b in mod.buffers()) / args.experts * hit
            med, low = res["fused"]
            print(f"| {bits} | {rows} | {med * 1e3:.3f} ({low * 1e3:.3f}) | {res['general'][0] * 1e3:.3f} "
                  f"({res['general'][1] * 1e3:.3f}) | {nbytes / low / 1e9:.1f} |")


def timed_all(fn, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times), min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--paths", nargs="+", default=["decode"], choices=["decode", "prefill"])
    p.add_argument("--isas", nargs="+", default=None,
                   help="default: cpu:avx512_vnni and cpu:avx2 where the CPU has them, and cpu:amx (packed_amx) where built")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hit", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--int4", action="store_true", help="also PyTorch's int4 kernel (4-bit)")
    p.add_argument("--layer", action="store_true", help="a whole MoE layer: the fused decode call vs the general path")
    p.add_argument("--cpu-time", action="store_true",
                   help="--layer: process CPU time instead of wall time (with --threads 1: robust on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer:
        return layer_main(args)
    features = cpu_features.detect()
    isas = args.isas or [i for i in ("cpu:amx", "cpu:avx512_vnni", "cpu:avx2") if features.has(i)]
    if "cpu:amx" in isas and not cpu_kernels.amx():
        isas.remove("cpu:amx")
    dtype = cpu_features.compute_dtype(features)
    gen = torch.Generator().manual_seed(0)
    slots = list(range(0, args.experts, args.experts // args.hit))[: args.hit]
    print(f"threads {args.threads}, best ISA {cpu_features.best_isa(features)}, tile dtype {dtype}, group {args.group}, "
          f"{args.hit} of {args.experts} experts per call, median of {args.repeats}")
    print("| proj | rows | kernel | bits | ms / expert | GB/s weights |")
    print("|---|---|---|---|---|---|")
    for proj, (in_f, out_f) in SHAPES.items():
        w16 = torch.randn(args.experts, out_f, in_f, generator=gen).to(torch.bfloat16)
        packed = {b: make(b, args.experts, in_f, out_f, args.group, gen) for b in args.bits}
        for rows in args.rows:
            x = torch.randn(rows * args.hit, in_f, generator=gen).to(torch.bfloat16)
            xs = x.split(rows)

            def bf16():
                return [xi @ w16[s].t() for xi, s in zip(xs, slots)]

            t = timed(bf16, args.repeats)
            print(f"| {proj} | {rows} | bf16 matmul | 16 | {t / args.hit * 1e3:.3f} | "
                  f"{args.hit * out_f * in_f * 2 / t / 1e9:.1f} |")
            for bits, (qw, sc, z) in packed.items():
                nbytes = args.hit * (qw[0].numel() + sc[0].numel() * 2 + z[0].numel())
                if bits == 4 and cpu_int4.available() and args.int4:  # PyTorch's int4 op, one call per expert
                    from moecompress.format.pack import unpack

                    i4 = {s: cpu_int4.pack_int4(unpack(qw[s], 4, in_f)) for s in slots}
                    sz = {s: cpu_int4.scales_and_zeros(sc[s], z[s], torch.bfloat16) for s in slots}
                    t = timed(lambda: [cpu_int4.int4_linear(xi, i4[s], args.group, sz[s]) for xi, s in zip(xs, slots)],
                              args.repeats)
                    print(f"| {proj} | {rows} | int4 (PyTorch) | 4 | {t / args.hit * 1e3:.3f} | {nbytes / t / 1e9:.1f} |")
                for isa in isas:
                    for path in args.paths if isa != "cpu:amx" else ["packed_amx"]:
                        if isa == "cpu:amx":
                            fn = lambda: cpu_kernels.packed_mm(x, qw, sc, z, bits, args.group, slots, [rows] * args.hit)
                        elif path == "decode":
                            fn = lambda: cpu_lowbit.decode(x, qw, sc, z, bits, args.group, slots, [rows] * args.hit, isa)
                        else:
                            fn = lambda: cpu_lowbit.prefill(x, qw, sc, z, bits, args.group, slots, [rows] * args.hit,
                                                            isa, dtype)
                        t = timed(fn, args.repeats)
                        label = path if isa == "cpu:amx" else f"{path} {isa}"
                        print(f"| {proj} | {rows} | {label} | {bits} | {t / args.hit * 1e3:.3f} | {nbytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
