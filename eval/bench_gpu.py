"""GPU benchmark of the packed-expert kernels (moecompress/runtime/cuda/) against transformers' bf16 experts.

Run on a CUDA machine (results: eval/results/gpu.md, copied from --out):

    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm    # everything below (about 5 minutes)
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --quick            # Qwen3 shape only in the layer table

1. Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul, measured here.
2. Sweeps (Qwen3 and Mixtral layers): the pair path's tile (columns per program, warps, groups per program = split
   of K, lop3 on/off), pair path against the routing-table path at 4 and 16 tokens, prefill tiles and row blocks.
   The setting with the lowest geometric mean of each sweep is used for the rest of the run (printed; launch.py's
   defaults are the ones chosen on an H200). Also the pair path against the tables path at real sizes (rel. diff).
3. MoE layers with real sizes: Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8) and Mixtral-8x7B (hidden
   4096, 8 experts of 14336, top-2), bit mix 25 % 2 / 50 % 3 / 25 % 4-bit (per expert, both projections) and
   uniform 4-bit, group 128, random packed weights: decode 1/4/16 tokens and prefill 2048 tokens. Each timed call
   gets a different routing (16 routings rotated: the active experts change, so they come from HBM, not the 60 MB
   L2). Decode is timed eager and as CUDA-graph replays of 16 back-to-back calls; prefill eager. Baseline:
   transformers' Qwen3MoeExperts in bf16 with each experts implementation (grouped_mm, batched_mm where it fits in
   memory, eager), graph-captured where it captures; the fastest counts. Floor: packed bytes of the distinct active
   experts / measured copy bandwidth. Memory: resident bytes of a layer's experts (torch.cuda.memory_allocated) vs
   their packed bytes; the transient workspace of a call.
4. End to end: refmoe-qwen3 (checkpoints exported on the CPU with RTN, carried in .gpu_carry/) and a random-init
   Qwen3-30B-A3B-dims model with --layers layers: forward of 8 x 256 tokens, greedy token-by-token generation
   (batch 1) as an eager loop with a DynamicCache and with each step one CUDA graph (StaticCache; in a child
   process per model, so that a failure there cannot stop the run), packed vs bf16 (grouped_mm and batched_mm).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from test_cuda_kernels import random_experts  # noqa: E402  (the tests' random layer builder)

from moecompress.runtime.cuda import launch  # noqa: E402

SHAPES = {"qwen3-30b-a3b": dict(hidden=2048, experts=128, inter=768, top_k=8),
          "mixtral-8x7b": dict(hidden=4096, experts=8, inter=14336, top_k=2)}
MIXES = {"mix 2/3/4": (0.25, 0.5, 0.25), "4-bit": (0.0, 0.0, 1.0)}
GROUP_SIZE = 128
ROTATE = 16


def bits_for(n: int, mix: tuple[float, float, float], seed: int = 0) -> list[int]:
    counts = [round(n * f) for f in mix]
    counts[1] = n - counts[0] - counts[2]
    bits = [2] * counts[0] + [3] * counts[1] + [4] * counts[2]
    random.Random(seed).shuffle(bits)
    return bits


def sync():
    torch.cuda.synchronize()


def time_calls(calls, graph: bool, repeats: int = 7) -> float:
    """Median microseconds per call of running `calls` back to back, eagerly or as one CUDA graph of all of them."""
    with torch.no_grad():
        for c in calls[:2]:
            c()
        sync()
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(stream)
            sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
            run = g.replay
        else:
            def run():
                for c in calls:
                    c()
        run()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            run()
            end.record()
            sync()
            times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def ceilings() -> dict:
    a = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_calls([lambda: b.copy_(a)], graph=False, repeats=10)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = time_calls([lambda: x @ y], graph=False, repeats=10)
    del x, y
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "copy_GBps": 2 * (2 << 30) / us / 1e3,
            "bf16_TFLOPs": 2 * 8192 ** 3 / mm_us / 1e6, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "transformers": __import__("transformers").__version__}


def routings(tokens: int, shape: dict, n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(tokens, shape["experts"], device="cuda", generator=gen)
        w, idx = torch.softmax(logits, -1).topk(shape["top_k"], dim=-1)
        x = torch.randn(tokens, shape["hidden"], device="cuda", generator=gen).to(torch.bfloat16)
        out.append((x, idx, (w / w.sum(-1, keepdim=True)).float()))
    return out


def packed_bytes_per_expert(layer) -> dict[int, int]:
    per = {}
    for name in layer.proj_names:
        for group in getattr(layer, name).children():
            n = len(group.experts)
            size = sum(b.nbytes for b in group.buffers()) // max(1, n)
            for e in group.experts:
                per[e] = per.get(e, 0) + size
    return per


def bf16_experts(shape: dict):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                            num_experts=shape["experts"], num_experts_per_tok=shape["top_k"], hidden_act="silu")
    with torch.device("cuda"):
        experts = Qwen3MoeExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, shape["hidden"] ** -0.5)
        experts.down_proj.normal_(0, shape["inter"] ** -0.5)
    return experts, config


def time_bf16(experts, config, shape, inputs, tokens) -> dict:
    """Every transformers experts implementation that fits; graph replay where it captures."""
    results = {}
    expert_bytes = 3 * shape["hidden"] * shape["inter"] * 2
    for impl in ("grouped_mm", "batched_mm", "eager"):
        if impl == "batched_mm" and tokens * shape["top_k"] * expert_bytes > 24e9:
            continue  # gathers one weight copy per (token, expert) pair
        if impl == "eager" and tokens > 1 and shape["experts"] > 64:
            continue
        config._experts_implementation = impl
        calls = [lambda x=x, i=i, w=w: experts(x, i, w.to(x.dtype)) for x, i, w in inputs]
        try:
            eager = time_calls(calls, graph=False)
        except Exception as exc:  # noqa: BLE001 (report, do not stop the benchmark)
            results[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:100]}"}
            continue
        graph = None
        if tokens <= 16 and impl != "eager":  # eager syncs on the host: not capturable
            try:
                graph = time_calls(calls, graph=True)
            except Exception:  # noqa: BLE001 (not capturable: eager only)
                graph = None
        results[impl] = {"eager_us": eager, "graph_us": graph}
        gc.collect()
        torch.cuda.empty_cache()
    return results


def layer_rows(args, peak, rows: list, write=lambda: None) -> list[dict]:
    for model, shape in SHAPES.items():
        experts, config = bf16_experts(shape)
        for mix_name, mix in MIXES.items():
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            layer = random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], mix),
                                   group_size=GROUP_SIZE, device="cuda", template=experts)
            sync()
            resident = torch.cuda.memory_allocated() - before
            per_expert = packed_bytes_per_expert(layer)
            packed = sum(per_expert.values())
            for tokens in args.tokens:
                inputs = routings(tokens, shape, ROTATE if tokens <= 16 else 2)
                active = statistics.mean(sum(per_expert[e] for e in set(i.flatten().tolist())) for _, i, _ in inputs)
                calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eager = time_calls(calls, graph=False)
                workspace = torch.cuda.max_memory_allocated() - base
                graph = time_calls(calls, graph=True) if tokens <= 16 else None
                ours = graph if graph is not None else eager
                bf16 = time_bf16(experts, config, shape, inputs, tokens)
                best = min(((k, min(t for t in (v["eager_us"], v["graph_us"]) if t)) for k, v in bf16.items()
                            if "eager_us" in v), key=lambda kv: kv[1])
                floor = active / (peak * 1e3)
                row = dict(model=model, mix=mix_name, tokens=tokens, ours_eager_us=eager, ours_graph_us=graph,
                           bf16=bf16, bf16_best=best[0], bf16_best_us=best[1], speedup=best[1] / ours,
                           active_MB=active / 1e6, floor_us=floor, over_floor=ours / floor,
                           bw_fraction=active / (ours * 1e3) / peak, resident_MB=resident / 1e6,
                           packed_MB=packed / 1e6, workspace_MB=workspace / 1e6)
                if tokens > 16:
                    flops = 2 * tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inter"]
                    row["ours_TFLOPs"] = flops / ours / 1e6
                    row["bf16_TFLOPs"] = flops / best[1] / 1e6
                rows.append(row)
                write()
                print(f"{model:14s} {mix_name:9s} T={tokens:5d} ours {ours:9.1f} us (eager {eager:9.1f}) "
                      f"bf16 {best[0]} {best[1]:9.1f} us  x{row['speedup']:.2f}  floor {floor:7.1f} us "
                      f"bw {row['bw_fraction']:.2f}", flush=True)
            del layer
            gc.collect()
            torch.cuda.empty_cache()
        del experts
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _layer(model: str, mix: str, template=None):
    shape = SHAPES[model]
    return random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], MIXES[mix]),
                          group_size=GROUP_SIZE, device="cuda", template=template)


def _sweep(name: str, settings: dict, cases: list, rows: list) -> dict:
    """Time every setting (a dict of launch attributes) on every case (model, mix, tokens); set launch to the
    setting with the lowest geometric mean over the cases and return it."""
    saved = {k: getattr(launch, k) for k in next(iter(settings.values()))}
    score = {}
    for model, mix, tokens in cases:
        layer = _layer(model, mix)
        inputs = routings(tokens, SHAPES[model], ROTATE if tokens <= 16 else 2)
        calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
        for label, setting in settings.items():
            for k, v in setting.items():
                setattr(launch, k, v)
            try:
                us = time_calls(calls, graph=tokens <= 16)
            except Exception as exc:  # noqa: BLE001 (a setting that does not compile or run: reported, skipped)
                print(f"{name} {label} {model} {mix} T={tokens}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                us = float("inf")
            score.setdefault(label, []).append(us)
            if us != float("inf"):
                rows.append(dict(tokens=tokens, variant=f"{name}: {label} ({model}, {mix})", us=us))
            print(f"{name:8s} {label:28s} {model:14s} {mix:9s} T={tokens:5d} {us:9.1f} us", flush=True)
            for k, v in saved.items():
                setattr(launch, k, v)
        del layer, calls
        gc.collect()
        torch.cuda.empty_cache()
    ok = {k: statistics.geometric_mean(v) for k, v in score.items() if all(t != float("inf") for t in v)}
    if not ok:
        print(f"{name}: no setting ran", flush=True)
        return None
    best = min(ok, key=ok.get)
    for k, v in settings[best].items():
        setattr(launch, k, v)
    rows.append(dict(tokens=0, variant=f"{name}: chosen {best}", us=float("nan")))
    print(f"{name}: chosen {best} {settings[best]}", flush=True)
    return settings[best]


def variant_rows(args) -> list[dict]:
    """Tile sweeps; the best setting of each sweep becomes launch's default for the rest of the run."""
    rows = []
    pair = {f"BN {bn} w{w} {g} groups/program": dict(PAIR_BLOCK_N=bn, PAIR_WARPS=w, PAIR_GROUPS_PER_PROGRAM=g)
            for bn, w, g in ((16, 2, 4), (16, 4, 4), (32, 4, 4), (16, 2, 2), (32, 2, 2), (16, 2, 8))}
    pair["BN 16 w2 4 groups/program, no lop3"] = dict(PAIR_BLOCK_N=16, PAIR_WARPS=2, PAIR_GROUPS_PER_PROGRAM=4,
                                                      PAIR_ASM=False)
    # the pair path against the routing-table path at real sizes: the same function (rel. difference)
    layer = _layer("qwen3-30b-a3b", "mix 2/3/4")
    for tokens in (1, 16):
        x, idx, w = routings(tokens, SHAPES["qwen3-30b-a3b"], 1, seed=9)[0]
        saved = launch.PAIR_TOKENS
        try:
            with torch.no_grad():
                a = layer(x, idx, w).float()
                launch.PAIR_TOKENS = 0
                b = layer(x, idx, w).float()
            diff = float((a - b).norm() / b.norm())
        except Exception as exc:  # noqa: BLE001
            print(f"pair vs tables: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            diff = float("nan")
        launch.PAIR_TOKENS = saved
        rows.append(dict(tokens=tokens, variant="pair path vs tables path, rel. difference (qwen3 mix)", us=diff))
        print(f"pair vs tables T={tokens}: rel diff {diff:.2e}", flush=True)
    del layer
    if _sweep("pair", pair, [("qwen3-30b-a3b", "mix 2/3/4", 1), ("mixtral-8x7b", "mix 2/3/4", 1)], rows) is None:
        launch.PAIR_TOKENS = 0
    # the pair path against the routing-table path (packed_kernel, tensor cores) at 4 and 16 tokens
    _sweep("decode", {"pair path": dict(PAIR_TOKENS=16), "tables path": dict(PAIR_TOKENS=0),
                      "pair path to 4 tokens": dict(PAIR_TOKENS=4)},
           [("qwen3-30b-a3b", "mix 2/3/4", 4), ("qwen3-30b-a3b", "mix 2/3/4", 16), ("mixtral-8x7b", "4-bit", 16)],
           rows)
    configs = {"128x128 w8 s3 BM<=128": (launch.Config(128, 128, 8, 3), 128),
               "128x64 w8 s3 BM<=128": (launch.Config(128, 64, 8, 3), 128),
               "256x64 w8 s3 BM<=128": (launch.Config(256, 64, 8, 3), 128),
               "128x64 w8 s3 BM<=256": (launch.Config(128, 64, 8, 3), 256),
               "64x128 w8 s3 BM<=256": (launch.Config(64, 128, 8, 3), 256)}
    prefill = {name: dict(PREFILL={b: c for b in (2, 3, 4, 8, 16)}, PREFILL_TALL={b: c for b in (2, 3, 4, 8, 16)},
                          PREFILL_MAX_ROWS=rows_) for name, (c, rows_) in configs.items()}
    _sweep("prefill", prefill, [("qwen3-30b-a3b", "mix 2/3/4", 2048), ("mixtral-8x7b", "4-bit", 2048)], rows)
    return rows


def tinygemm_rows() -> list[dict]:
    """PyTorch's int4 kernel (torch._weight_int4pack_mm, what torchao's int4 weight-only CUDA path calls): 4-bit
    group-128 experts of the Qwen3 shape, one call per active expert and projection (it has no grouped MoE form),
    graph-captured: what an existing int4 kernel gives at decode. Random weights (timing only)."""
    shape = SHAPES["qwen3-30b-a3b"]
    hidden, inter, n = shape["hidden"], shape["inter"], shape["experts"]

    def weight(out_f, in_f):
        packed = torch.randint(0, 255, (out_f, in_f // 2), dtype=torch.uint8, device="cuda")
        w = torch._convert_weight_to_int4pack(packed, 8)
        sz = torch.rand(in_f // GROUP_SIZE, out_f, 2, device="cuda").to(torch.bfloat16)
        return w, sz

    gate_up = [weight(2 * inter, hidden) for _ in range(n)]
    down = [weight(hidden, inter) for _ in range(n)]
    rows = []
    for tokens in (1, 16):
        calls = []
        for x, idx, w in routings(tokens, shape, ROTATE):
            pairs = {}
            for t, row in enumerate(idx.tolist()):
                for k, e in enumerate(row):
                    pairs.setdefault(e, []).append((t, k))
            plan = [(e, torch.tensor([t for t, _ in p], device="cuda"), w[[t for t, _ in p], [k for _, k in p]])
                    for e, p in pairs.items()]

            def call(x=x, plan=plan):
                out = torch.zeros(x.shape[0], hidden, device="cuda", dtype=torch.float32)
                for e, rows_e, w_e in plan:
                    h = torch._weight_int4pack_mm(x[rows_e], gate_up[e][0], GROUP_SIZE, gate_up[e][1])
                    g, u = h.chunk(2, -1)
                    y = torch._weight_int4pack_mm((torch.nn.functional.silu(g) * u).contiguous(), down[e][0],
                                                  GROUP_SIZE, down[e][1])
                    out.index_add_(0, rows_e, y.float() * w_e[:, None])
                return out
            calls.append(call)
        us = time_calls(calls, graph=True)
        rows.append(dict(tokens=tokens, variant="torch int4 tinygemm, per expert (4-bit)", us=us))
        print(f"tinygemm T={tokens} {us:.1f} us", flush=True)
    return rows


def set_impl(model, impl: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation_internal"):
            config._experts_implementation = impl


def time_model(model, vocab: int, new_tokens: int) -> dict:
    from transformers import DynamicCache

    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (8, 256), device="cuda", generator=gen)
    with torch.no_grad():
        fwd = time_calls([lambda: model(input_ids=ids, use_cache=False)], graph=False, repeats=5)
        prompt = torch.randint(0, vocab, (1, 32), device="cuda", generator=gen)
        times = []
        for _ in range(3):
            cache = DynamicCache()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            sync()
            times.append((time.perf_counter() - t) / new_tokens * 1e3)
        logits = model(input_ids=ids[:1, :64], use_cache=False).logits.float()
    return {"forward_8x256_ms": fwd / 1e3, "decode_ms_per_token": statistics.median(times), "logits": logits}


def _rewind(cache, n: int) -> None:
    """Put a StaticCache back to n cached tokens: its layers count the tokens written in a device tensor of their own
    (cumulative_length, advanced in place by every step: also by warm-ups and graph replays) and write there,
    whatever cache_position says; without this the replays run past the cache (index_copy_ out of bounds)."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(n)


def decode_graph_ms(model, prompt, new_tokens: int, graph: bool = True, runs: int = 3):
    """Greedy generation, batch 1, with a StaticCache and each one-token step replayed as one CUDA graph (the next
    token is picked on the device: no host sync per token). Median ms per token of `runs` runs. graph=False: the
    same steps called eagerly (returns (ms, tokens of the last run): a check of the step on any device)."""
    from transformers import StaticCache

    n, dev = prompt.shape[1], prompt.device
    cache = StaticCache(config=model.config, max_cache_len=n + new_tokens + 8)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(n, device=dev), use_cache=True)
    first = out.logits[:, -1:].argmax(-1)
    ids = first.clone()
    pos = torch.tensor([n], device=dev)

    def step():
        return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _rewind(cache, n)
                step()
        torch.cuda.current_stream().wait_stream(stream)
        sync()
        cuda_graph = torch.cuda.CUDAGraph()
        _rewind(cache, n)
        with torch.cuda.graph(cuda_graph):
            logits = step()
        run_step = cuda_graph.replay
    else:
        logits = None
    times, tokens = [], []
    for _ in range(runs):
        pos.fill_(n)
        ids.copy_(first)
        _rewind(cache, n)
        tokens = []
        if dev.type == "cuda":
            sync()
        t = time.perf_counter()
        for _ in range(new_tokens):
            if graph:
                run_step()
            else:
                logits = step()
            ids.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)
            if not graph:
                tokens.append(int(ids))
        if dev.type == "cuda":
            sync()
        times.append((time.perf_counter() - t) / new_tokens * 1e3)
    return statistics.median(times) if graph else (statistics.median(times), tokens)


E2E_VARIANTS = {"refmoe-qwen3": ["bf16 grouped_mm", "bf16 batched_mm", "packed mix", "packed 4bit"],
                "random": ["bf16 grouped_mm", "bf16 batched_mm", "packed mix 2/3/4", "packed 4-bit"]}


def build_model(kind: str, variant: str, layers: int):
    """One end-to-end model on the GPU: refmoe-qwen3 (bf16, or the packed checkpoints exported on the CPU with RTN
    and carried in .gpu_carry/) or a random-init Qwen3-30B-A3B-dims model with `layers` layers (bf16, or its
    experts replaced by random packed ones at a bit mix, the bf16 modules' gate kept)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import moecompress

    carry = ROOT / ".gpu_carry"
    if kind == "refmoe-qwen3":
        if variant.startswith("bf16"):
            model = AutoModelForCausalLM.from_pretrained(carry / "refmoe-qwen3-bf16", dtype=torch.bfloat16)
            model = model.cuda().eval()
            set_impl(model, variant.split()[1])
            return model
        return moecompress.from_pretrained(carry / f"refmoe-qwen3-{variant.split()[1]}", dtype=torch.bfloat16,
                                           device_map="cuda").eval()
    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if variant.startswith("bf16"):
        set_impl(model, variant.split()[1])
        return model
    mix = MIXES[variant.removeprefix("packed ")]
    for i, layer in enumerate(model.model.layers):
        template = layer.mlp.experts  # the bf16 module: its gate is used
        layer.mlp.experts = random_experts(128, 2048, 768, bits_for(128, mix, seed=i), group_size=GROUP_SIZE,
                                           device="cuda", template=template, seed=i)
        del template
        gc.collect()
        torch.cuda.empty_cache()
    return model


def graph_decode_child(spec: str, args) -> None:
    """--graph-decode KIND:VARIANT: build one model, print its graph-replayed decode time (a child process, so that
    a failure on the device cannot stop the main benchmark)."""
    kind, variant = spec.split(":", 1)
    model = build_model(kind, variant, args.layers)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda", generator=gen)
    with torch.no_grad():
        ms = decode_graph_ms(model, prompt, args.new_tokens)
    print("GRAPH_RESULT " + json.dumps(dict(spec=spec, ms=ms)), flush=True)


def graph_decode(kind: str, variant: str, args) -> float:
    import subprocess

    cmd = [sys.executable, __file__, "--graph-decode", f"{kind}:{variant}", "--layers", str(args.layers),
           "--new-tokens", str(args.new_tokens)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print(f"graph decode {kind} {variant}: timed out", flush=True)
        return float("nan")
    for line in proc.stdout.splitlines():
        if line.startswith("GRAPH_RESULT "):
            return json.loads(line.removeprefix("GRAPH_RESULT "))["ms"]
    err = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    print(f"graph decode {kind} {variant}: failed: {' | '.join(err[-3:])[:400]}", flush=True)
    return float("nan")


def end_to_end(args) -> list[dict]:
    rows = []
    for kind, variants in E2E_VARIANTS.items():
        if kind == "refmoe-qwen3" and not (ROOT / ".gpu_carry" / "refmoe-qwen3-bf16").exists():
            continue
        name = kind if kind != "random" else f"random Qwen3-30B-A3B dims, {args.layers} layers"
        ref = None
        for variant in variants:
            row = dict(model=name, variant=variant)
            if variant != "bf16 batched_mm":  # batched_mm gathers a weight copy per pair: decode only
                model = build_model(kind, variant, args.layers)
                r = time_model(model, model.config.vocab_size, args.new_tokens)
                if ref is None:
                    ref = r["logits"]
                elif kind == "refmoe-qwen3":
                    row["logits_rel_diff_vs_bf16"] = float((r["logits"] - ref).norm() / ref.norm())
                row.update({k: v for k, v in r.items() if k != "logits"})
                del model
                gc.collect()
                torch.cuda.empty_cache()
            row["decode_graph_ms_per_token"] = graph_decode(kind, variant, args)
            print(row, flush=True)
            rows.append(row)
    return rows


def report(info: dict, rows: list[dict], variants: list[dict], e2e: list[dict], secs: float) -> str:
    lines = [f"# GPU kernels for packed experts: `python eval/bench_gpu.py`", "",
             f"Device: {info['gpu']}; torch {info['torch']}, Triton {info['triton']}, transformers "
             f"{info['transformers']}. Measured ceilings: copy {info['copy_GBps']:.0f} GB/s (read + write), bf16 "
             f"matmul {info['bf16_TFLOPs']:.0f} TFLOP/s. Group size {GROUP_SIZE}, asymmetric; {secs:.0f} s.", "",
             "## MoE layer (one call; decode: CUDA-graph replay of 16 calls with different routings, per call)", "",
             "| model | bits | tokens | ours µs | ours eager µs | best bf16 (impl) µs | speedup | active MB | floor µs "
             "| ours / floor | bandwidth | resident / packed MB | workspace MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = r["ours_graph_us"] if r["ours_graph_us"] is not None else r["ours_eager_us"]
        extra = f" ({r['ours_TFLOPs']:.0f} vs {r['bf16_TFLOPs']:.0f} TFLOP/s)" if "ours_TFLOPs" in r else ""
        lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | {ours:.1f} | {r['ours_eager_us']:.1f} | "
                     f"{r['bf16_best_us']:.1f} ({r['bf16_best']}) | {r['speedup']:.2f}x{extra} | {r['active_MB']:.1f} | "
                     f"{r['floor_us']:.1f} | {r['over_floor']:.1f}x | {100 * r['bw_fraction']:.0f} % | "
                     f"{r['resident_MB']:.1f} / {r['packed_MB']:.1f} | {r['workspace_MB']:.1f} |")
    lines += ["", "bf16 implementations (µs, eager / graph):", ""]
    for r in rows:
        impls = "; ".join(f"{k} {v.get('eager_us', 0):.1f} / {v.get('graph_us') or float('nan'):.1f}" if "eager_us" in v
                          else f"{k} {v['error']}" for k, v in r["bf16"].items())
        lines.append(f"- {r['model']} {r['mix']} T={r['tokens']}: {impls}")
    if variants:
        lines += ["", "## Sweeps (µs per layer call; decode graph-replayed; the chosen setting is used below)", "",
                  "| tokens | variant | µs |", "|---|---|---|"]
        lines += [f"| {v['tokens']} | {v['variant']} | {v['us']:.3g} |" for v in variants]
        if "chosen" in info:
            lines += ["", f"Settings chosen by the sweeps and used for every table of this run: {info['chosen']}"]
    if e2e:
        lines += ["", "## End to end (forward 8 x 256 tokens; greedy decode batch 1: eager loop with a DynamicCache, "
                  "and each step one CUDA graph with a StaticCache)", "",
                  "| model | variant | forward ms | decode ms / token, eager | decode ms / token, graph | "
                  "logits rel. diff vs bf16 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['variant']} | {r.get('forward_8x256_ms', float('nan')):.2f} | "
                  f"{r.get('decode_ms_per_token', float('nan')):.2f} | "
                  f"{r.get('decode_graph_ms_per_token', float('nan')):.2f} | "
                  f"{r.get('logits_rel_diff_vs_bf16', float('nan')):.3f} |" for r in e2e]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--quick", action="store_true", help="Qwen3 shape only in the layer table")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 2048])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random 30B-dims model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["layers", "variants", "e2e", "tinygemm"])
    parser.add_argument("--graph-decode", help=argparse.SUPPRESS)  # child process of graph_decode
    args = parser.parse_args(argv)
    if args.graph_decode:
        graph_decode_child(args.graph_decode, args)
        return
    t0 = time.time()
    info = ceilings()
    print(info, flush=True)
    peak = info["copy_GBps"]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu-quick" if args.quick else "gpu"
    rows, variants, e2e = [], [], []

    def write():  # after every stage: a run stopped at its time limit still leaves what it measured
        (args.out / f"{name}.json").write_text(json.dumps(dict(info=info, layers=rows, variants=variants, e2e=e2e),
                                                          indent=1))
        text = report(info, rows, variants, e2e, time.time() - t0)
        (args.out / f"{name}.md").write_text(text)
        return text

    if "tinygemm" not in args.skip:
        try:
            variants += tinygemm_rows()
        except Exception as exc:  # noqa: BLE001 (report and go on)
            print(f"tinygemm: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if "variants" not in args.skip:
        variants += variant_rows(args)
        info["chosen"] = dict(pair_block_n=launch.PAIR_BLOCK_N, pair_warps=launch.PAIR_WARPS,
                              pair_tokens=launch.PAIR_TOKENS, prefill=str(launch.PREFILL[4]),
                              prefill_tall=str(launch.PREFILL_TALL[4]),
                              prefill_max_rows=launch.PREFILL_MAX_ROWS)
    write()
    if args.quick:
        SHAPES.pop("mixtral-8x7b")
    if "layers" not in args.skip:
        layer_rows(args, peak, rows, write)
    write()
    if "e2e" not in args.skip:
        e2e += end_to_end(args)
    print(write())


if __name__ == "__main__":
    main()
