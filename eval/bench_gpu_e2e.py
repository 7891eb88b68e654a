"""End-to-end GPU benchmark: packed-expert models against bf16, forward and greedy generation (eager and CUDA graph).

Run on a CUDA machine (results: eval/results/gpu_e2e.md|json, copied from --out):

    PYTHONPATH=. python eval/bench_gpu_e2e.py --out $OUT          # about 6 minutes on an H200

Models: refmoe-qwen3 (bf16 from .gpu_carry/refmoe-qwen3-bf16, and checkpoints exported on the CPU with RTN, carried
in .gpu_carry/refmoe-qwen3-{mix,4bit}) and a random-init Qwen3-30B-A3B-dims model with --layers layers (bf16, or
its experts replaced by random packed ones at the mix 25 % 2 / 50 % 3 / 25 % 4-bit or uniform 4-bit, group 128).
bf16 runs transformers' grouped_mm and batched_mm experts implementations.

Per model, in a child process of its own (a failure on the device cannot stop the others):
- forward of 8 x 256 tokens (no cache; median of 5);
- greedy generation, batch 1, prompt --prompt tokens: the eager loop with a DynamicCache (what model.generate
  does) and GraphDecoder (moecompress.runtime.cuda.graph_decode: StaticCache, each step one CUDA graph replay).
  ms per token = (time of prompt + N tokens - time of prompt + 1 token) / (N - 1), median of 3 runs each;
- the graph's tokens == the same steps run eagerly, and == the DynamicCache loop's tokens (printed as checks);
- refmoe-qwen3: the logits' rel. difference from bf16 (first 64 tokens of a row);
- --batch rows of left-padded prompts, sampled (temperature 0.8, top-p 0.95, seed 0): transformers' model.generate
  against GraphDecoder (ms per step of all rows), graph tokens == eager steps' with the same seed; packed models
  also with the launch defaults before session 21 (pair path always: PAIR_MAX_MEAN_ROWS inf), batch 1 and batched
  (--no-pair-always: not).
Its decode figures are wall-clock differences of whole generate calls: a few % apart from run to run and between
child processes (session 26: 0.996x where replay-timed graphs of the same call gave 1.04x); ratios within ~10 % of 1
need eval/bench_gpu_trace.py (graph replays between CUDA events, settings interleaved in one process).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))
from bench_gpu import GROUP_SIZE, MIXES, bits_for, random_experts, sync, time_calls  # noqa: E402

CARRY = ROOT / ".gpu_carry"
DEVICE = "cuda"  # (a dry run of the script's logic on the CPU sets "cpu")
VARIANTS = {"refmoe-qwen3": ["bf16 grouped_mm", "bf16 batched_mm", "packed mix", "packed 4bit"],
            "random": ["bf16 grouped_mm", "bf16 batched_mm", "packed mix 2/3/4", "packed 4-bit"]}


def set_impl(model, impl: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation_internal"):
            config._experts_implementation = impl


def build_model(kind: str, variant: str, layers: int):
    """One model on the GPU (see the module doc)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import moecompress

    if kind == "refmoe-qwen3":
        if variant.startswith("bf16"):
            model = AutoModelForCausalLM.from_pretrained(CARRY / "refmoe-qwen3-bf16", dtype=torch.bfloat16)
            model = model.to(DEVICE).eval()
            set_impl(model, variant.split()[1])
            return model
        return moecompress.from_pretrained(CARRY / f"refmoe-qwen3-{variant.split()[1]}", dtype=torch.bfloat16,
                                           device_map=DEVICE).eval()
    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if variant.startswith("bf16"):
        set_impl(model, variant.split()[1])
        return model
    mix = MIXES[variant.removeprefix("packed ")]
    for i, layer in enumerate(model.model.layers):
        template = layer.mlp.experts  # the bf16 module: its gate is used
        layer.mlp.experts = random_experts(128, 2048, 768, bits_for(128, mix, seed=i), group_size=GROUP_SIZE,
                                           device=DEVICE, template=template, seed=i)
        del template
        gc.collect()
        torch.cuda.empty_cache()
    return model


def dynamic_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Eager greedy loop with a DynamicCache: (seconds, tokens [1, n + new_tokens])."""
    from transformers import DynamicCache

    sync()
    t = time.perf_counter()
    cache, step, out = DynamicCache(), prompt, [prompt]
    for _ in range(new_tokens):
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
        step = logits.argmax(-1, keepdim=True)
        out.append(step)
    sync()
    return time.perf_counter() - t, torch.cat(out, 1)


def per_token_ms(run, new_tokens: int, runs: int = 3) -> float:
    """(time of prompt + N tokens - time of prompt + 1 token) / (N - 1): the decode time per token, median."""
    full = statistics.median(run(new_tokens) for _ in range(runs))
    one = statistics.median(run(1) for _ in range(runs))
    return (full - one) / (new_tokens - 1) * 1e3


def child(spec: str, args) -> dict:
    from moecompress.runtime.cuda.graph_decode import GraphDecoder

    kind, variant = spec.split(":", 1)
    model = build_model(kind, variant, args.layers)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, vocab, (8, 256), device=DEVICE, generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt), device=DEVICE, generator=gen)
    row: dict = dict(model=kind, variant=variant)
    with torch.no_grad():
        if variant != "bf16 batched_mm":  # batched_mm gathers one weight copy per (token, expert) pair: decode only
            row["forward_8x256_ms"] = time_calls([lambda: model(input_ids=ids, use_cache=False)], graph=False,
                                                 repeats=5) / 1e3
        logits = model(input_ids=ids[:1, :64], use_cache=False).logits.float()
        torch.save(logits.cpu(), args.logits_dir / f"{kind}-{variant.replace(' ', '_').replace('/', '')}.pt")
        dynamic_decode(model, prompt, 4)  # warm-up (Triton compiles)
        row["decode_eager_ms"] = per_token_ms(lambda n: dynamic_decode(model, prompt, n)[0], args.new_tokens)
        eager_tokens = dynamic_decode(model, prompt, args.new_tokens)[1]
        row["graph_error"] = None
        try:
            max_len = args.prompt + args.new_tokens + 8
            decoder = GraphDecoder(model, max_len)
            t = time.perf_counter()
            graph_tokens = decoder.generate(prompt, args.new_tokens)  # captures the step's graph
            sync()
            row["graph_capture_s"] = time.perf_counter() - t

            row["decode_graph_ms"] = per_token_ms(lambda n: timed_generate(decoder, prompt, n), args.new_tokens)
            static_tokens = GraphDecoder(model, max_len, graph=False).generate(prompt, args.new_tokens)
            row["graph_equals_eager_static"] = bool(torch.equal(graph_tokens, static_tokens))
            row["graph_equals_dynamic_cache"] = bool(torch.equal(graph_tokens, eager_tokens))
            row["tokens_compared"] = args.new_tokens
            if variant.startswith("packed") and args.pair_always:  # the previous launch defaults, batch 1
                with pair_path_always():
                    other = GraphDecoder(model, max_len)
                    other.generate(prompt, 4)
                    row["decode_graph_ms_pair_always"] = per_token_ms(
                        lambda n: timed_generate(other, prompt, n), args.new_tokens)
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            row.update(batched(model, args, vocab, gen, packed=variant.startswith("packed") and args.pair_always))
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            row["batched_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


SAMPLING = dict(temperature=0.8, top_p=0.95)


class pair_path_always:
    """The launch defaults before session 21 (PAIR_MAX_MEAN_ROWS inf: up to PAIR_TOKENS tokens every packed layer
    takes the pair path, also above 2 rows per expert), for the duration of a with block (graphs captured inside keep
    them): what the default (2 rows per expert, then the tables path with the DECODE_DENSE tile) is weighed against."""

    def __enter__(self):
        from moecompress.runtime.cuda import launch

        self.saved = launch.PAIR_MAX_MEAN_ROWS
        launch.PAIR_MAX_MEAN_ROWS = float("inf")

    def __exit__(self, *exc):
        from moecompress.runtime.cuda import launch

        launch.PAIR_MAX_MEAN_ROWS = self.saved


def timed_generate(decoder, ids, n, **kwargs) -> float:
    sync()
    t = time.perf_counter()
    decoder.generate(ids, n, **kwargs)
    sync()
    return time.perf_counter() - t


def batched(model, args, vocab: int, gen, packed: bool) -> dict:
    """args.batch rows, prompts of args.prompt // 2 .. args.prompt tokens left-padded (attention mask), sampled
    (SAMPLING, seed 0): transformers' model.generate (DynamicCache, eager) against GraphDecoder, ms per token; the
    graph's tokens against the same steps run eagerly (same seed); packed: also with the pair path always."""
    from moecompress.runtime.cuda.graph_decode import GraphDecoder

    rows, n = args.batch, args.prompt
    lengths = torch.randint(n // 2, n + 1, (rows,), device=DEVICE, generator=gen)
    ids = torch.randint(1, vocab, (rows, n), device=DEVICE, generator=gen)
    mask = (torch.arange(n, device=DEVICE)[None] >= n - lengths[:, None]).long()
    ids = ids * mask  # padding token 0
    model.generation_config.eos_token_id = None  # every call makes all its tokens

    def hf(k):
        sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=k, do_sample=True, pad_token_id=0, **SAMPLING)
        sync()
        return time.perf_counter() - t
    out: dict = {"batch": rows}
    try:
        hf(2)
        out["batched_hf_generate_ms"] = per_token_ms(hf, args.new_tokens)
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        out["batched_hf_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    max_len = n + args.new_tokens + 8
    kwargs = dict(attention_mask=mask, sample=True, seed=0, **SAMPLING)
    decoder = GraphDecoder(model, max_len, rows)
    tokens = decoder.generate(ids, args.new_tokens, **kwargs)
    out["batched_graph_ms"] = per_token_ms(lambda k: timed_generate(decoder, ids, k, **kwargs), args.new_tokens)
    eager = GraphDecoder(model, max_len, rows, graph=False).generate(ids, args.new_tokens, **kwargs)
    out["batched_graph_equals_eager"] = bool(torch.equal(tokens, eager))
    del decoder
    if packed:
        with pair_path_always():
            decoder = GraphDecoder(model, max_len, rows)
            decoder.generate(ids, 4, **kwargs)
            out["batched_graph_ms_pair_always"] = per_token_ms(lambda k: timed_generate(decoder, ids, k, **kwargs),
                                                             args.new_tokens)
    return out


def run_children(args) -> list[dict]:
    rows = []
    for kind, variants in VARIANTS.items():
        if kind == "refmoe-qwen3" and not (CARRY / "refmoe-qwen3-bf16").exists():
            print("refmoe-qwen3: .gpu_carry/ not here (export it on the CPU first): skipped", flush=True)
            continue
        for variant in variants:
            if args.only and f"{kind}:{variant}" not in args.only:
                continue
            cmd = [sys.executable, __file__, "--child", f"{kind}:{variant}", "--layers", str(args.layers),
                   *([] if args.pair_always else ["--no-pair-always"]),
                   "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt), "--batch", str(args.batch),
                   "--logits-dir",
                   str(args.logits_dir)]
            started = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(lines[-1].removeprefix("RESULT ")) if lines else dict(
                    model=kind, variant=variant, error=" | ".join(proc.stderr.strip().splitlines()[-3:])[:400])
            except subprocess.TimeoutExpired:
                row = dict(model=kind, variant=variant, error=f"timed out after {args.child_timeout} s")
            row["child_s"] = round(time.perf_counter() - started, 1)  # (what a shorter run can leave out)
            rows.append(row)
            print(row, flush=True)
            # what a run stopped at its time limit measured (the tables are written at the end)
            (args.out / "gpu_e2e.partial.json").write_text(json.dumps(rows, indent=1))
    ref = args.logits_dir / "refmoe-qwen3-bf16_grouped_mm.pt"
    for row in rows:
        path = args.logits_dir / f"{row['model']}-{row['variant'].replace(' ', '_').replace('/', '')}.pt"
        if row["model"] == "refmoe-qwen3" and ref.exists() and path.exists() and path != ref:
            a, b = torch.load(path), torch.load(ref)
            row["logits_rel_diff_vs_bf16"] = float((a - b).norm() / b.norm())
    return rows


def report(rows: list[dict], args, info: dict) -> str:
    def f(v, fmt=".2f"):
        return format(v, fmt) if isinstance(v, float) else "n/a"

    lines = ["# End to end on a GPU: `python eval/bench_gpu_e2e.py`", "",
             f"Device: {info['gpu']}; torch {info['torch']}, transformers {info['transformers']}. Greedy decode, "
             f"batch 1, prompt {args.prompt} tokens, {args.new_tokens} new tokens; random model: Qwen3-30B-A3B dims, "
             f"{args.layers} layers.", "",
             "| model | variant | forward 8x256 ms | decode ms/token, eager (DynamicCache) | decode ms/token, CUDA graph "
             "(GraphDecoder) | graph tokens == eager | logits rel. diff vs bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error'][:150]} | | | | |")
            continue
        same = ("n/a" if r.get("graph_error") else
                f"{'yes' if r['graph_equals_eager_static'] else 'NO'} (static), "
                f"{'yes' if r['graph_equals_dynamic_cache'] else 'no'} (DynamicCache)")
        graph = f(r.get("decode_graph_ms")) if not r.get("graph_error") else f"failed: {r['graph_error'][:120]}"
        lines.append(f"| {r['model']} | {r['variant']} | {f(r.get('forward_8x256_ms'))} | "
                     f"{f(r.get('decode_eager_ms'))} | {graph} | {same} | "
                     f"{f(r.get('logits_rel_diff_vs_bf16'), '.3f')} |")
    lines += ["", f"Left-padded batch of {args.batch} rows (prompts of {args.prompt // 2}-{args.prompt} tokens), sampled "
              f"(temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, seed 0), {args.new_tokens} new tokens, "
              "ms per step of all rows. 'pair path always': the launch defaults before session 21 (PAIR_MAX_MEAN_ROWS "
              "inf), in the same process.", "",
              "| model | variant | transformers generate (eager) | GraphDecoder | graph == eager steps | GraphDecoder, "
              "pair path always | batch 1 greedy graph: default / pair path always |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        if r.get("batched_error"):
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['batched_error'][:150]} | | | | |")
            continue
        hf = f(r.get("batched_hf_generate_ms")) if "batched_hf_error" not in r else f"failed: {r['batched_hf_error'][:80]}"
        lines.append(f"| {r['model']} | {r['variant']} | {hf} | {f(r.get('batched_graph_ms'))} | "
                     f"{'yes' if r.get('batched_graph_equals_eager') else 'NO'} | {f(r.get('batched_graph_ms_pair_always'))} "
                     f"| {f(r.get('decode_graph_ms'))} / {f(r.get('decode_graph_ms_pair_always'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random 30B-dims model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="rows of the padded, sampled generation")
    parser.add_argument("--child-timeout", type=int, default=240)
    parser.add_argument("--no-pair-always", dest="pair_always", action="store_false",
                        help="skip the runs with the launch defaults before session 21 (a shorter run)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="children to run, as MODEL:VARIANT (e.g. 'random:packed 4-bit'); default: all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--logits-dir", type=Path, default=Path("/tmp/moecompress-e2e-logits"))
    args = parser.parse_args(argv)
    args.logits_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    import transformers

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_children(args)
    (args.out / "gpu_e2e.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    text = report(rows, args, info)
    (args.out / "gpu_e2e.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
