"""Runtime benchmark: resident memory vs packed bytes, and CPU forward tokens/s vs the bf16 model.

Models: (a) the trained reference model in ../shared (refmoe-qwen3), (b) a random-init Qwen3-MoE with Qwen3-30B-A3B's
layer sizes (2 decoder layers, vocab reduced). Each bit plan is quantized with RTN and exported; each checkpoint is
loaded once in a fresh subprocess for memory (VmRSS before/after from_pretrained), then all models of one benchmark
model are timed in one process, interleaved round-robin so that a changing CPU load hits every row alike.

    .venv/bin/python eval/bench_runtime.py                 # both models, writes eval/results/runtime.md
    .venv/bin/python eval/bench_runtime.py --models a --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PLANS = ("4", "mixed", "2", "3", "8")
MIXED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class BenchModel:
    name: str
    group_size: int
    prefill: tuple[int, int]  # (batch, tokens)
    decode: tuple[int, int]


def bench_models(args) -> dict[str, BenchModel]:
    return {"a": BenchModel("a: refmoe-qwen3", 64, args.prefill_a, args.decode),
            "b": BenchModel("b: Qwen3-30B-A3B dims, 2 layers", 128, args.prefill_b, args.decode)}


def vm_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- building the models and checkpoints ----------------------------------------------------------------------------
def build_random_30b_dims(out: Path, vocab: int, seed: int = 0) -> None:
    """(b): Qwen3-30B-A3B MoE dims (hidden 2048, expert width 768, 128 experts top-8, 32/4 heads of 128), 2 layers."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)


def plan_for(layout, name: str, group_size: int):
    from moecompress.artifacts.bit_plan import BitPlan

    if name != "mixed":
        return BitPlan.uniform(layout, int(name), group_size=group_size)
    # every bit-width in every layer: expert e of layer l, projection j gets MIXED_BITS[(e + l + j) % 4]
    experts = {m.experts_path: {p.name: tuple(MIXED_BITS[(e + m.layer + j) % 4] for e in range(m.num_experts))
                                for j, p in enumerate(m.projs)} for m in layout.moe_layers}
    return BitPlan(group_size=group_size, symmetric=False, experts=experts)


def export_plans(bf16_dir: Path, work: Path, key: str, plans, group_size: int) -> dict[str, Path]:
    """RTN-quantize the bf16 model at each plan and export it (skipped where the checkpoint exists)."""
    from transformers import AutoModelForCausalLM

    from moecompress.arch.adapters import describe
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    dirs = {p: work / f"{key}-{p}" for p in plans}
    todo = [p for p in plans if not (dirs[p] / "config.json").exists()]
    if todo:
        model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
        layout = describe(model)
        for p in todo:
            print(f"[{key}] quantize + export plan {p}", flush=True)
            plan = plan_for(layout, p, group_size)
            quantized = quantize_model(model, layout, plan, None, QuantizeOptions(method="rtn"), progress=False)
            export_checkpoint(model, layout, plan, quantized, dirs[p], overwrite=True)
            del quantized
            gc.collect()
    return dirs


# -- measuring --------------------------------------------------------------------------------------------------------
def load(directory: Path, mmap: bool = True):
    import moecompress
    from transformers import AutoModelForCausalLM

    kwargs = {} if mmap else {"disable_mmap": True}
    if (directory / "moecompress.json").exists():
        return moecompress.from_pretrained(directory, dtype=torch.bfloat16, **kwargs)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs)


def measure_load(directory: Path, threads: int, mmap: bool, prefill: tuple[int, int]) -> dict:
    """Run in a fresh process: RSS increase (anonymous + file-backed) of loading one model, then after one prefill
    forward (mmapped weights count once touched), and the model's resident bytes."""
    torch.set_num_threads(threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    import moecompress  # noqa: F401  (imported before the baseline RSS)
    from moecompress.runtime.loading.inspect import resident_bytes

    with torch.device("meta"):  # page in the modeling code first: library memory is not model memory
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    gc.collect()
    before = {f: vm_kib(f) for f in ("VmRSS", "RssAnon", "RssFile")}
    model = load(directory, mmap)
    gc.collect()
    delta = {f: (vm_kib(f) - kib) * 1024 for f, kib in before.items()}
    with torch.inference_mode():
        model(torch.zeros(prefill, dtype=torch.long), use_cache=False, logits_to_keep=1)  # no big logits
    gc.collect()
    return {"rss": delta["VmRSS"], "rss_anon": delta["RssAnon"], "rss_file": delta["RssFile"],
            "rss_forward": (vm_kib("VmRSS") - before["VmRSS"]) * 1024,
            "resident": resident_bytes(model), "experts_impl": model.config._experts_implementation}


def measure_load_subprocess(directory: Path, threads: int, prefill: tuple[int, int], mmap: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--measure-load", str(directory), "--threads", str(threads),
           "--prefill-a", "x".join(map(str, prefill))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd + ([] if mmap else ["--no-mmap"]), capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def disk_bytes(directory: Path) -> int:
    from moecompress.runtime.loading.inspect import tensor_table

    return sum(b for _, b in tensor_table(directory).values())


def time_interleaved(models: dict, shape: tuple[int, int], vocab: int, warmup: int, repeats: int,
                     min_sample_s: float) -> dict[str, list]:
    """Seconds per forward of each model on the same random ids, models taking turns within every repeat; a sample
    averages enough forwards to last `min_sample_s` (decode-like shapes are short)."""
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(warmup):
            for m in models.values():
                m(ids, use_cache=False)
        per_round = (time.perf_counter() - t0) / max(warmup, 1) / len(models)
        inner = max(1, round(min_sample_s / max(per_round, 1e-6)))
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    m(ids, use_cache=False)
                times[k].append((time.perf_counter() - t0) / inner)
    return times


def bench_one(key: str, bm: BenchModel, args, work: Path) -> list[dict]:
    bf16_dir = REPO / args.ref_model if key == "a" else work / "b-bf16"
    if key == "b" and not (bf16_dir / "config.json").exists():
        print("[b] building the random-init model", flush=True)
        build_random_30b_dims(bf16_dir, args.vocab_b)
    dirs = {"bf16": bf16_dir, **export_plans(bf16_dir, work, key, args.plans, bm.group_size)}
    rows = []
    for plan, d in dirs.items():
        print(f"[{key}] load {plan} in a fresh process", flush=True)
        mem = measure_load_subprocess(d, args.threads, bm.prefill)
        no_mmap = measure_load_subprocess(d, args.threads, bm.prefill, mmap=False)
        rows.append({"model": bm.name, "plan": plan, "dir": d, "disk": disk_bytes(d), **mem,
                     "rss_no_mmap": no_mmap["rss"], "rss_forward_no_mmap": no_mmap["rss_forward"]})
    models = {r["plan"]: load(r["dir"]).eval() for r in rows}
    vocab = models["bf16"].config.vocab_size
    for phase, shape in (("prefill", bm.prefill), ("decode", bm.decode)):
        print(f"[{key}] timing {phase} {shape[0]}x{shape[1]}", flush=True)
        times = time_interleaved(models, shape, vocab, args.warmup, args.repeats, args.min_sample_s)
        for r in rows:
            ts = times[r["plan"]]
            r[phase] = {"tok_s": shape[0] * shape[1] / statistics.median(ts), "best": shape[0] * shape[1] / min(ts),
                        "times": ts}
    base = rows[0]
    for r in rows:
        for phase in ("prefill", "decode"):
            r[phase]["x_bf16"] = r[phase]["tok_s"] / base[phase]["tok_s"]
            r[phase]["x_bf16_best"] = r[phase]["best"] / base[phase]["best"]
    del models
    gc.collect()
    return rows


# -- reporting --------------------------------------------------------------------------------------------------------
def avg_bits(directory: Path) -> str:
    from moecompress.runtime.loading.inspect import checkpoint_report

    if not (directory / "moecompress.json").exists():
        return "16"
    layers = checkpoint_report(directory)["layers"]
    return f"{sum(x['avg_bits'] for x in layers) / len(layers):.2f}"


def table(rows: list[dict]) -> str:
    mb = 1 / 2**20
    head = ("| model | expert bits | packed MB | resident MB | resident / packed | RSS after load MB (anon + file) "
            "| RSS / packed: load, +prefill | same, disable_mmap | prefill tok/s median (best) | x bf16 median (best) "
            "| decode tok/s median (best) | x bf16 median (best) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bits = avg_bits(r["dir"])
        cells = [r["model"], f"mixed {bits}" if r["plan"] == "mixed" else bits, f"{r['disk'] * mb:.1f}",
                 f"{r['resident'] * mb:.1f}", f"{r['resident'] / r['disk']:.3f}",
                 f"{r['rss'] * mb:.0f} ({r['rss_anon'] * mb:.0f} + {r['rss_file'] * mb:.0f})",
                 f"{r['rss'] / r['disk']:.2f}, {r['rss_forward'] / r['disk']:.2f}",
                 f"{r['rss_no_mmap'] / r['disk']:.2f}, {r['rss_forward_no_mmap'] / r['disk']:.2f}"]
        for phase in ("prefill", "decode"):
            p = r[phase]
            cells += [f"{p['tok_s']:.1f} ({p['best']:.1f})", f"{p['x_bf16']:.2f} ({p['x_bf16_best']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict], args, models: dict[str, BenchModel], load: tuple[float, float], secs: float) -> str:
    """The markdown page: setup, then the table."""
    shapes = "; ".join(f"{bm.name}: group_size {bm.group_size}, prefill {bm.prefill[0]}x{bm.prefill[1]}, "
                       f"decode-like {bm.decode[0]}x{bm.decode[1]} (no KV cache)" for k, bm in models.items()
                       if k in args.models)
    impl = sorted({r["experts_impl"] for r in rows if r["plan"] == "bf16"})
    return "\n".join([
        "# Runtime benchmark: packed experts on CPU",
        "",
        f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {os.cpu_count()} CPUs; "
        f"bf16 baseline experts implementation: {', '.join(impl)}; RTN quantization, asymmetric.",
        f"{shapes}.",
        f"Timing: {args.warmup} warm-up rounds, then {args.repeats} samples per row (a sample averages forwards "
        f"over >= {args.min_sample_s} s), rows interleaved: median and best. Load average (1 min) {load[0]:.1f} "
        f"before, {load[1]:.1f} after, wall {secs / 60:.1f} min: under load the tokens/s are pessimistic; the x bf16 "
        "ratios compare rows timed under the same load.",
        "packed MB: tensor bytes of the checkpoint (bf16 row: the bf16 model). resident: "
        "runtime.loading.inspect.resident_bytes. RSS: VmRSS increase over from_pretrained in a fresh process (modeling "
        "code paged in first), split into anonymous and file-backed pages, and again after one prefill forward "
        "(mmapped weights count once touched); disable_mmap: the same with from_pretrained(..., disable_mmap=True).",
        "",
        table(rows),
        "",
    ])


def parse_args(argv=None):
    pair = lambda s: tuple(int(v) for v in s.lower().split("x"))  # noqa: E731  "4x256" -> (4, 256)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-model", default="../shared/models/refmoe-qwen3", help="model (a), relative to the repo")
    ap.add_argument("--models", default="a,b", type=lambda s: s.split(","), help="which of a,b")
    ap.add_argument("--plans", default=",".join(PLANS), type=lambda s: s.split(","), help=f"of {','.join(PLANS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-a", type=pair, default=(4, 256))
    ap.add_argument("--prefill-b", type=pair, default=(1, 512))
    ap.add_argument("--decode", type=pair, default=(1, 8))
    ap.add_argument("--vocab-b", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.5, help="forwards per timing sample last at least this")
    ap.add_argument("--workdir", default="/tmp/moecompress-bench", help="checkpoints are kept here and reused")
    ap.add_argument("--out", default="eval/results/runtime.md")
    ap.add_argument("--measure-load", help=argparse.SUPPRESS)
    ap.add_argument("--no-mmap", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(Path(args.measure_load), args.threads, not args.no_mmap, args.prefill_a)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = bench_models(args)
    t0, load0 = time.time(), os.getloadavg()[0]
    rows = [r for k in args.models for r in bench_one(k, models[k], args, work)]
    text = report(rows, args, models, (load0, os.getloadavg()[0]), time.time() - t0)
    print(text)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(
        [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows], indent=1))


if __name__ == "__main__":
    main()
