"""Per-token decode time: the whole-model C++ step (CpuDecoder) against one transformers forward per token.

For each checkpoint: a 128-token prompt, then `--gen` greedy tokens, batch 1 (and --batches), each decoder in turn
over --rounds interleaved rounds; per token: CPU time of this thread (time.thread_time, meaningful with one thread
on a loaded machine) and wall time; medians. Checkpoints: eval/bench_cpu.py's (kept under its --workdir).

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_cpu_step.py --models a-4,b-4 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_cpu_step.py --models a-bf16,a-8 --threads 1 --clock cpu --profile
    .venv/bin/python eval/bench_cpu_step.py --models a-8,a-4,a-2,b-4 --threads 2 --out eval/results/cpu_step.md

--profile: instead, where the step's wall time goes, per part of step.cpp (DecodeStep.profile: embedding, norms,
q/k/v, q/k norm + RoPE + cache write, attention, o_proj, router, experts, shared expert, lm_head), ms per token and
the weight / cache bytes each part reads in GB/s (against --bandwidth, the machine's measured read bandwidth);
--clock cpu: the calling thread's CPU time instead of wall time (with --threads 1 on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

WORKDIR = Path("/tmp/moecompress-bench-cpu")


REF_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "refmoe-qwen3"


def checkpoint(name: str, workdir: Path) -> Path:
    """a-4 -> workdir/a-4-densematch (bench_cpu.py's naming; b's with the head8 suffix when present); a-bf16 ->
    ../shared/models/refmoe-qwen3, b-bf16 -> workdir/b-bf16 (the unquantized transformers checkpoints)."""
    key, plan = name.split("-", 1)
    if plan == "bf16":
        d = REF_MODEL if key == "a" else workdir / "b-bf16"
        if d.exists():
            return d
    for suffix in ("-densematch-head8", "-densematch") if key == "b" else ("-densematch",):
        d = workdir / f"{key}-{plan}{suffix}"
        if d.exists():
            return d
    raise SystemExit(f"no checkpoint for {name} under {workdir}: run eval/bench_cpu.py --prepare-only first")


def timed_steps(step, gen: int) -> tuple[float, float]:
    """(thread seconds, wall seconds) of `gen` calls of step()."""
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(gen):
        step()
    return time.thread_time() - c0, time.perf_counter() - w0


def transformers_loop(model, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    out = model(ids, use_cache=True, logits_to_keep=1)
    state = {"past": out.past_key_values, "nxt": out.logits[:, -1:].argmax(-1)}

    def step():
        o = model(state["nxt"], past_key_values=state["past"], use_cache=True)
        state["past"], state["nxt"] = o.past_key_values, o.logits[:, -1:].argmax(-1)

    return timed_steps(step, gen)


def step_loop(decoder, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    """`gen` greedy steps in one C++ call (CpuDecoder.greedy_steps, what its generate runs)."""
    n = ids.shape[1]
    logits, positions = decoder.prefill(ids, torch.ones_like(ids))
    nxt, pos = logits.argmax(-1), positions[:, -1] + 1
    c0, w0 = time.thread_time(), time.perf_counter()
    decoder.greedy_steps(nxt, pos, n, gen)
    return time.thread_time() - c0, time.perf_counter() - w0


def load(directory: Path):
    """A moecompress checkpoint, or an unquantized transformers one (bf16), in bfloat16."""
    import moecompress
    from transformers import AutoModelForCausalLM

    if (directory / "moecompress.json").exists():
        return moecompress.from_pretrained(directory, dtype=torch.bfloat16).eval()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()


def measure(directory: Path, args) -> list[dict]:
    from moecompress.runtime.cpu_step import CpuDecoder

    model = load(directory)
    vocab, rows = model.config.vocab_size, []
    gen_ids = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in args.batches:
            ids = torch.randint(0, vocab, (b, args.prompt), generator=gen_ids)
            decoder = CpuDecoder(model, args.prompt + args.gen + 1, b)
            step_loop(decoder, ids[:, :16], 4), transformers_loop(model, ids[:, :16], 4)  # warm-ups
            samples = {"step": [], "transformers": []}
            for _ in range(args.rounds):
                samples["step"].append(step_loop(decoder, ids, args.gen))
                samples["transformers"].append(transformers_loop(model, ids, args.gen))
            for name, s in samples.items():
                rows.append({"model": directory.name, "batch": b, "decoder": name,
                             "cpu_ms": 1e3 * statistics.median(c for c, _ in s) / args.gen,
                             "wall_ms": 1e3 * statistics.median(w for _, w in s) / args.gen})
            print(json.dumps(rows[-2:]), flush=True)
    return rows


PROFILE_COLUMNS = "| checkpoint | batch | part | ms / token | share | MB / token | GB/s | bound ms (at --bandwidth) |"


def profile(directory: Path, args) -> list[str]:
    """Rows of the per-part table: the step's own clock over --rounds x --gen tokens after the prompt."""
    from moecompress.runtime.cpu_step import CpuDecoder

    model = load(directory)
    gen_ids = torch.Generator().manual_seed(0)
    lines = []
    with torch.no_grad():
        for b in args.batches:
            ids = torch.randint(0, model.config.vocab_size, (b, args.prompt), generator=gen_ids)
            decoder = CpuDecoder(model, args.prompt + args.gen + 1, b)
            step_loop(decoder, ids[:, :16], 4)  # warm-up
            decoder.step.set_profile({"wall": 1, "cpu": 2}[args.clock])
            walls = [step_loop(decoder, ids, args.gen)[1] for _ in range(args.rounds)]
            parts = decoder.step.profile()
            steps = parts.pop("steps")[0]
            total = sum(sec for sec, _ in parts.values())
            for name, (sec, read) in [*parts.items(), ("all parts", (total, sum(r for _, r in parts.values())))]:
                if not sec:
                    continue
                ms, mb = 1e3 * sec / steps, read / steps / 1e6
                gbs = f"{read / sec / 1e9:.1f}" if read else ""
                bound = f"{1e3 * read / steps / (args.bandwidth * 1e9):.3f}" if read else ""
                lines.append(f"| {directory.name} | {b} | {name} | {ms:.3f} | {sec / total:.0%} | {mb:.2f} | {gbs} | {bound} |")
            lines.append(f"| {directory.name} | {b} | (whole greedy_steps call, wall) | {1e3 * statistics.median(walls) / args.gen:.3f} "
                         "| | | | |")
            print("\n".join(lines[-len(parts) - 2:]), flush=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="a-4", help="comma-separated KEY-PLAN, e.g. a-8,a-4,a-2,b-4")
    ap.add_argument("--workdir", default=str(WORKDIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--batches", default="1", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="markdown table to write")
    ap.add_argument("--profile", action="store_true", help="per-part wall time of the step instead (see above)")
    ap.add_argument("--bandwidth", type=float, default=19.0, help="GB/s of the machine's reads (--profile)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="--profile: wall time, or the calling thread's CPU time (one thread on a loaded machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        lines = [f"Decode step per part ({args.threads} thread(s), {args.rounds} x {args.gen} tokens after a "
                 f"{args.prompt}-token prompt; {args.clock} time by the step's clock; load average at the end "
                 f"{os.getloadavg()[0]:.1f})", "", PROFILE_COLUMNS, "|---|---|---|---|---|---|---|---|"]
        for name in args.models.split(","):
            lines += profile(checkpoint(name, Path(args.workdir)), args)
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return
    rows = []
    for name in args.models.split(","):
        rows += measure(checkpoint(name, Path(args.workdir)), args)
    lines = [f"Decode per token, ms (medians of {args.rounds} interleaved rounds of {args.gen} tokens after a "
             f"{args.prompt}-token prompt; {args.threads} thread(s); load average at the end "
             f"{os.getloadavg()[0]:.1f}). cpu = time.thread_time of the calling thread.", "",
             "| checkpoint | batch | step cpu | step wall | transformers cpu | transformers wall | speed-up (wall) |",
             "|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        s, t = rows[i], rows[i + 1]
        lines.append(f"| {s['model']} | {s['batch']} | {s['cpu_ms']:.2f} | {s['wall_ms']:.2f} | {t['cpu_ms']:.2f} | "
                     f"{t['wall_ms']:.2f} | {t['wall_ms'] / s['wall_ms']:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
