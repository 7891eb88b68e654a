"""Tables of eval/bench_cpu.py: the CPU named, bytes of active weights per decode step, the bandwidth bound, goals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm")
MB = 1 / 2**20


def cpu_info() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model_name": fields.get("Model name", "?").strip(), "cpus": fields.get("CPU(s)", "?").strip(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def _experts_hit(n: int, k: int, batch: int) -> float:
    """Expected distinct experts of a layer that `batch` tokens route to, each to k of n (uniform routing)."""
    return n * (1 - (1 - k / n) ** batch)


def _active(sizes: dict[str, int], is_expert, is_embed, has_head: bool, n: int, k: int, batches) -> dict:
    """Bytes read per decode step: every non-expert tensor except the embedding (one row; it is the output matrix too
    when the head is tied), and the hit share of the expert tensors."""
    experts = sum(b for name, b in sizes.items() if is_expert(name))
    embed = sum(b for name, b in sizes.items() if is_embed(name))
    dense = sum(sizes.values()) - experts - (embed if has_head else 0)
    return {f"b{b}": dense + experts * _experts_hit(n, k, b) / n for b in batches}


def _moe_config(hf_dir: Path) -> tuple[int, int]:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return cfg.get("num_experts") or cfg["num_local_experts"], cfg["num_experts_per_tok"]


def active_bytes_hf(directory: Path, batches) -> dict:
    from moecompress.runtime.loading.inspect import tensor_table

    sizes = {name: b for name, (_, b) in tensor_table(directory).items()}
    n, k = _moe_config(directory)
    return _active(sizes, lambda s: ".experts." in s, lambda s: "embed_tokens" in s,
                   any(s.startswith("lm_head.") for s in sizes), n, k, batches)


def active_bytes_gguf(gguf: Path, batches, hf_dir: Path, gguf_py: Path) -> dict:
    sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(gguf).tensors}
    n, k = _moe_config(hf_dir)
    return _active(sizes, lambda s: "_exps" in s, lambda s: s.startswith("token_embd"), "output.weight" in sizes, n,
                   k, batches)


# -- markdown ---------------------------------------------------------------------------------------------------------
def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _incr(r: dict) -> int:
    """Our process's RSS growth from before loading to the end of the run, less shared libraries loaded meanwhile."""
    return r["rss_end"] - r["rss_base"] - r.get("rss_libs_added", 0)


def _parts(r: dict) -> str:
    """The increase after the run split (bench_cpu_rss.py): model tensors + freed heap glibc kept + the rest."""
    keys = ("rss_weights", "rss_freed_heap", "rss_other")
    return " + ".join(f"{r[k] * MB:.1f}" for k in keys) if all(k in r for k in keys) else "-"


def engine_table(rows: list[dict], bw: float, batches) -> list[str]:
    head = ["engine", "weights", "file MB", "active MB/token (b1)", "prefill tok/s"]
    head += [f"decode b{b} tok/s" for b in batches] + [f"bound b{b}" for b in batches] + ["decode b1 / bound"]
    head += ["RSS after load MB (incr)", "RSS after run MB (incr)", "peak RSS MB", "RSS incr after run / file",
             "of which weights + freed heap + other MB", "rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bound = {b: b * bw / r["active"][f"b{b}"] for b in batches}
        ours = r["engine"].startswith("ours")
        cells = [r["engine"], r["plan"], f"{r['bytes'] * MB:.1f}", f"{r['active']['b1'] * MB:.1f}",
                 _fmt(r.get("prefill"))]
        cells += [_fmt(r.get(f"decode_b{b}")) for b in batches] + [f"{bound[b]:.0f}" for b in batches]
        cells += [_fmt(r["decode_b1"] / bound[1] if "decode_b1" in r else None, ".3f")]
        if ours:
            cells += [f"{r['rss_load'] * MB:.0f} ({(r['rss_load'] - r['rss_base']) * MB:.0f})",
                      f"{r['rss_end'] * MB:.0f} ({(r['rss_end'] - r['rss_base']) * MB:.0f})", f"{r['hwm_end'] * MB:.0f}",
                      f"{_incr(r) / r['bytes']:.2f}", _parts(r)]
        else:
            peak = max(r.get("rss_peak", 0), r.get("rss_peak_bench", 0))
            cells += ["-", "-", f"{peak * MB:.0f}", f"{peak / r['bytes']:.2f} (peak / file)", "-"]
        cells.append(str(r.get("rounds_done", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals_table(rows: list[dict], match: dict, bw: float) -> list[str]:
    by = {(r["engine"], r["plan"]): r for r in rows}
    head = ["ours", "llama.cpp", "decode b1 ours / llama", "decode b4 ours / llama", "prefill ours / llama",
            "decode b1: bound / ours (goal <= 1.5)", "RSS incr after run / file (goal <= 1.10)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for plan, gguf in match.items():
        o, g = by.get(("ours", plan)), by.get(("llama.cpp", gguf))
        if o is None or "decode_b1" not in o:
            continue
        ratio = lambda key: _fmt(o[key] / g[key], ".2f") if g and key in g and key in o else "-"  # noqa: E731
        bound = bw / o["active"]["b1"]
        lines.append("| " + " | ".join([plan, gguf if g else "-", ratio("decode_b1"), ratio("decode_b4"),
                                        ratio("prefill"), f"{bound / o['decode_b1']:.2f}",
                                        f"{_incr(o) / o['bytes']:.2f}"]) + " |")
    return lines


def _bandwidth_text(result: dict) -> str:
    bw, gb = result["bandwidth"], lambda xs: ", ".join(f"{x / 1e9:.1f}" for x in xs)
    readings = result.get("bandwidth_readings", [bw])
    if not result.get("bandwidth_probes"):  # results of session 24 and before
        return ("Measured read bandwidth (float32 sum of 1 GiB, best of 7, on 4 KB and on 2 MB pages, before each "
                "round and at the end; the bound uses the highest reading): "
                f"{bw / 1e9:.1f} GB/s (readings {gb(readings)}).")
    torch_sum = [x for p in result["bandwidth_probes"] for x in p["torch_sum"]]
    return (f"Measured read bandwidth (eval/bench_cpu_probe.py, before each round and at the end: {result['threads']} "
            "threads reading 1 GiB on 2 MB pages as a plain stream, with and without software prefetch, and in the "
            "decode's pattern, 8 scattered 768 KiB matrices per parallel loop; a reading = the fastest variant's "
            f"median of 5 passes; the bound uses the median reading): {bw / 1e9:.1f} GB/s (readings {gb(readings)}; "
            f"session 24's probe, a torch float32 sum best of 7, read {gb(torch_sum)}: its highest, "
            f"{max(torch_sum) / 1e9:.1f}, would have been the old rule's).")


def write_report(result: dict, out: Path) -> str:
    cpu, bw = result["cpu"], result["bandwidth"]
    batches = result["shapes"]["batches"]
    s = result["shapes"]
    lines = ["# CPU benchmark: moecompress vs llama.cpp", "",
             f"CPU: {cpu['model_name']} ({cpu['cpus']} CPUs), flags: {', '.join(cpu['flags'])}; "
             f"{result['threads']} threads. {_bandwidth_text(result)}",
             *([result["emulation"]] if result.get("emulation") else []),
             f"Command: `{result['command']}` (wall {result['wall_s'] / 60:.1f} min, load average "
             f"{result['load'][0]:.1f} before, {result['load'][1]:.1f} after).",
             f"Prefill: one {s['prefill']}-token sequence. Decode: {s['gen']} tokens one step at a time with the KV "
             f"cache after a {s['prompt']}-token prompt, batch {' and '.join(map(str, batches))} (ours: greedy, "
             "only the steps timed; llama.cpp: llama-batched-bench S_TG). Medians over interleaved rounds, each "
             "configuration in a fresh process.",
             "active MB/token: bytes read per decode step (non-expert tensors except the embedding, plus the hit "
             "share of the experts; batch b hits n(1-(1-k/n)^b) experts per layer). bound bB: tokens/s if those bytes "
             "streamed at the measured bandwidth. RSS (ours): VmRSS after from_pretrained and after the whole run "
             "(weights are memory-mapped: pages count once touched, and the run touches every expert), in parentheses "
             "the increase over the process before loading (torch, transformers, modeling code paged in); peak: "
             "VmHWM at the end. llama.cpp: peak VmHWM of llama-bench / llama-batched-bench (includes its runtime, "
             "buffers and any repacked weights). RSS incr after run / file: that increase less shared libraries loaded "
             "meanwhile (the C++ kernel modules), over the checkpoint's tensor bytes (packed + dense); of which "
             "(eval/bench_cpu_rss.py, at the run's end): the model's tensors resident, freed heap that malloc_trim "
             "then returns, and the rest (per-process state: imported modules' objects, first-use state of torch and "
             "transformers, threads).",
             "RTN with min-max ranges (random weights: quality is not measured here); our quantized plans also "
             "quantize the attention linears (8-bit for plan 8, else 4-bit, group as the experts); "
             + ("lm_head, router and norms stay bf16" if result.get("head_bits", "16") == "16" else
                f"lm_head {result['head_bits']}-bit in model (b) (tied to the embeddings in (a): bf16), router and "
                "norms bf16") + ". Group size: 64 for (a), 128 for (b). ours-unfused: ours without the fused MoE "
             "decode call (runtime/experts/cpu_moe.py), i.e. per-group kernel calls with routing in Python.",
             ""]
    for key in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == key]
        title = {"a": "(a) refmoe-qwen3 (../shared)", "b": "(b) random-init, Qwen3-30B-A3B MoE dims, 2 layers"}[key]
        lines += [f"## {title}", ""] + engine_table(rows, bw, batches) + ["", "Goals (matching types):", ""]
        lines += goals_table(rows, result["match"], bw) + [""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    return text
