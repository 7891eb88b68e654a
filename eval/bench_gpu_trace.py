"""Trace of a small model's batched generation step on a GPU: where the time of one CUDA-graph decode step goes.

Built for issue 14's refmoe-qwen3 16-row regression (session 25: packed 1.23-1.28 ms per step against bf16
batched_mm 1.18; session 21: 0.76-1.08 against 1.34-1.36). Per (code tree, variant), in a child process of its own:

- the GraphDecoder step (16 left-padded rows, sampled T 0.8 top-p 0.95, as eval/bench_gpu_e2e.py; and batch 1
  greedy) timed as rounds of --replays graph replays between CUDA events (after the prompt, outside the events), the
  launch settings interleaved round by round (packed: `default`; `dense` = the tables path above 2 rows per expert
  as in sessions 21-25 (launch.PAIR_DENSE_MIN_BYTES 0), `dense_gated` = the same with launch.DECODE_GATED; code
  before session 26: `pair` = launch.PAIR_MAX_MEAN_ROWS inf), median / min / max of --rounds rounds;
- the same step as bench_gpu_e2e measures it ((generate 32 - generate 1) / 31, median of 3);
- the 16-row step greedy (the sampling's share), graph tokens == eager steps' (default setting), and with
  --profile the kernels of one step (torch.profiler over an eager step and over graph replays): count and device µs
  by kernel name.

Session 26 (H200): the 16-row step of HEAD == session 21's code (bf0001e) within 0.3 %, replays of one graph within
0.1 % of each other: no regression. Session 25's 0.92-0.96x came from bench_gpu_e2e's wall-clock figure
((generate 32 - generate 1) / 31, median of 3: a few % from run to run) across processes and machine instances;
session 21's 0.76 ms cannot be reproduced (the step's kernels alone take 0.88 ms). The pair path at 16 rows is the
gain (launch.PAIR_DENSE_MIN_BYTES).

    PYTHONPATH=. python eval/bench_gpu_trace.py --export                    # CPU: .gpu_carry/refmoe-qwen3-*
    PYTHONPATH=. python eval/bench_gpu_trace.py --out $OUT [--code .bisect/bf0001e]   # GPU (~3 min)

--code adds older code trees (git archive COMMIT moecompress | tar -x -C DIR): the same script runs their
moecompress (only APIs common to both: moecompress.from_pretrained, GraphDecoder, launch.PAIR_MAX_MEAN_ROWS).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry"
SHARED = ROOT.parent / "shared" / "models" / "refmoe-qwen3"
VARIANTS = ["bf16 batched_mm", "bf16 grouped_mm", "packed mix", "packed 4bit"]
SAMPLING = dict(temperature=0.8, top_p=0.95)
MIX = (0.25, 0.5, 0.25)  # shares of 2 / 3 / 4-bit experts (eval/bench_gpu.py's mix)
GROUP_SIZE = 64  # the refmoe-qwen3 recipe's


# -- CPU: the checkpoints ---------------------------------------------------------------------------------------------
def mix_bits(n: int, seed: int) -> tuple[int, ...]:
    counts = [round(n * f) for f in MIX]
    counts[1] = n - counts[0] - counts[2]
    bits = [2] * counts[0] + [3] * counts[1] + [4] * counts[2]
    random.Random(seed).shuffle(bits)
    return tuple(bits)


def export(out: Path = CARRY) -> None:
    """.gpu_carry/refmoe-qwen3-bf16 (the shared model's files) and RTN exports at the mix and at 4 bits, group 64."""
    from transformers import AutoModelForCausalLM

    from moecompress.arch.adapters import describe
    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    bf16 = out / "refmoe-qwen3-bf16"
    bf16.mkdir(parents=True, exist_ok=True)
    for f in SHARED.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != "train_log.json" and not f.name.startswith("tokenizer"):
            shutil.copy(f, bf16 / f.name)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    layout = describe(model)
    plans = {"4bit": BitPlan.uniform(layout, 4, group_size=GROUP_SIZE),
             "mix": BitPlan(group_size=GROUP_SIZE, symmetric=False, experts={
                 m.experts_path: {p.name: mix_bits(m.num_experts, m.layer) for p in m.projs}
                 for m in layout.moe_layers})}
    for name, plan in plans.items():
        quantized = quantize_model(model, layout, plan, None, QuantizeOptions(method="rtn"), progress=False)
        export_checkpoint(model, layout, plan, quantized, out / f"refmoe-qwen3-{name}", overwrite=True)
        print(f"exported {out / f'refmoe-qwen3-{name}'}", flush=True)


# -- GPU: one child ------------------------------------------------------------------------------------------------
def sync() -> None:
    torch.cuda.synchronize()


def load(variant: str):
    from transformers import AutoModelForCausalLM

    import moecompress

    if variant.startswith("bf16"):
        model = AutoModelForCausalLM.from_pretrained(CARRY / "refmoe-qwen3-bf16", dtype=torch.bfloat16).cuda().eval()
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_experts_implementation_internal"):
                config._experts_implementation = variant.split()[1]
        return model
    return moecompress.from_pretrained(CARRY / f"refmoe-qwen3-{variant.split()[1]}", dtype=torch.bfloat16,
                                       device_map="cuda").eval()


class Setting:
    """Launch attributes set for a with block (graphs captured inside keep their launches)."""

    def __init__(self, **attrs):
        self.attrs = attrs

    def __enter__(self):
        from moecompress.runtime.cuda import launch

        self.saved = {k: getattr(launch, k) for k in self.attrs}
        for k, v in self.attrs.items():
            setattr(launch, k, v)

    def __exit__(self, *exc):
        from moecompress.runtime.cuda import launch

        for k, v in self.saved.items():
            setattr(launch, k, v)


def settings_for(variant: str) -> dict[str, dict]:
    if variant.startswith("bf16"):
        return {"default": {}}
    from moecompress.runtime.cuda import launch

    if not hasattr(launch, "DECODE_GATED"):  # code before session 26
        return {"default": {}, "pair": dict(PAIR_MAX_MEAN_ROWS=float("inf"))}
    out = {"default": {}, "dense": dict(DECODE_GATED=False, PAIR_DENSE_MIN_BYTES=0),
           "dense_gated": dict(DECODE_GATED=True, PAIR_DENSE_MIN_BYTES=0)}
    if launch.PAIR_DENSE_MIN_BYTES == 0:  # the rows rule alone is the default: the pair path beside it
        out["pair"] = dict(PAIR_MAX_MEAN_ROWS=float("inf"))
    return out


def prompts(vocab: int, rows: int, n: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if rows == 1:
        return torch.randint(0, vocab, (1, n), device="cuda", generator=gen), None
    lengths = torch.randint(n // 2, n + 1, (rows,), device="cuda", generator=gen)
    ids = torch.randint(1, vocab, (rows, n), device="cuda", generator=gen)
    mask = (torch.arange(n, device="cuda")[None] >= n - lengths[:, None]).long()
    return ids * mask, mask


class Case:
    """One GraphDecoder (rows, sampled or greedy) under one setting: its graph captured at construction."""

    def __init__(self, model, rows: int, sample: bool, setting: dict, args):
        from moecompress.runtime.cuda.graph_decode import GraphDecoder

        self.ids, self.mask = prompts(model.config.vocab_size, rows, args.prompt)
        self.kwargs = dict(attention_mask=self.mask, sample=sample, seed=0, **(SAMPLING if sample else {}))
        self.mode = (sample, sample and SAMPLING["top_p"] < 1)
        self.replays, self.setting = args.replays, setting
        with Setting(**setting):
            self.decoder = GraphDecoder(model, args.prompt + max(args.replays, args.new_tokens) + 8, rows)
            self.tokens = self.decoder.generate(self.ids, args.new_tokens, **self.kwargs)  # captures
        self.graph = self.decoder._graphs[self.mode]

    def equals_eager(self, model, args) -> bool:
        """The graph's tokens == the same steps run eagerly (same seed, same setting)."""
        from moecompress.runtime.cuda.graph_decode import GraphDecoder

        with Setting(**self.setting):
            eager = GraphDecoder(model, self.decoder.max_cache_len, self.ids.shape[0], graph=False).generate(
                self.ids, args.new_tokens, **self.kwargs)
        return bool(torch.equal(eager, self.tokens))

    def start(self) -> None:
        d = self.decoder
        if self.mode[0]:
            d._temperature.fill_(SAMPLING["temperature"])
            d._top_p.fill_(SAMPLING["top_p"])
            d._generator.manual_seed(0)
        d._start(self.ids, self.mask, self.mode)

    def round_ms(self) -> float:
        self.start()
        sync()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(self.replays):
            self.graph.replay()
        b.record()
        sync()
        return a.elapsed_time(b) / self.replays

    def e2e_ms(self, new_tokens: int) -> float:
        """bench_gpu_e2e's figure: (generate N - generate 1) / (N - 1), median of 3."""
        def run(k):
            sync()
            t = time.perf_counter()
            self.decoder.generate(self.ids, k, **self.kwargs)
            sync()
            return time.perf_counter() - t
        full = statistics.median(run(new_tokens) for _ in range(3))
        one = statistics.median(run(1) for _ in range(3))
        return (full - one) / (new_tokens - 1) * 1e3


def kernels(prof, steps: int) -> dict:
    """{kernel name: [count per step, device µs per step]} from a profile of `steps` steps."""
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and t > 0:
            out[e.key[:120]] = [e.count / steps, round(t / steps, 2)]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def profile_case(case: Case) -> dict:
    from torch.profiler import ProfilerActivity, profile

    res = {}
    case.start()
    with Setting(**case.setting):
        case.decoder._step(case.mode)  # warm
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                case.decoder._step(case.mode)
            sync()
    res["eager"] = kernels(prof, 3)
    case.start()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            case.graph.replay()
        sync()
    res["graph"] = kernels(prof, 5)
    for k in ("eager", "graph"):
        res[k + "_kernels_per_step"] = round(sum(v[0] for v in res[k].values()), 1)
        res[k + "_device_us_per_step"] = round(sum(v[1] for v in res[k].values()), 1)
    return res


def child(code: str, variant: str, args) -> dict:
    import transformers

    import moecompress

    model = load(variant)
    row = dict(code=code, variant=variant, moecompress=str(Path(moecompress.__file__).parent),
               torch=torch.__version__, transformers=transformers.__version__, gpu=torch.cuda.get_device_name())
    with torch.no_grad():
        cases = {}
        for name, setting in settings_for(variant).items():
            if name in args.skip_settings:
                continue
            cases[f"16 sampled {name}"] = Case(model, args.batch, True, setting, args)
            if name == "default" or args.all_cases:
                cases[f"1 greedy {name}"] = Case(model, 1, False, setting, args)
        cases["16 greedy default"] = Case(model, args.batch, False, {}, args)
        ref = cases["16 sampled default"].tokens
        row["tokens_equal_default"] = {k: bool(torch.equal(c.tokens, ref)) for k, c in cases.items()
                                       if k.startswith("16 sampled")}
        row["graph_equals_eager"] = {k: cases[k].equals_eager(model, args) for k in ("16 sampled default",
                                                                                    "1 greedy default")}
        for c in cases.values():  # warm replays
            c.round_ms()
        rounds: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):  # interleaved: each round every case once
            for k, c in cases.items():
                rounds[k].append(c.round_ms())
        row["step_ms"] = {k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in rounds.items()}
        row["e2e_ms"] = {k: cases[k].e2e_ms(args.new_tokens) for k in cases if k.startswith("16 sampled")}
        if args.profile:
            row["profile"] = {k: profile_case(cases[k]) for k in cases if k.startswith("16 sampled")}
    return row


def run_children(args) -> list[dict]:
    rows = []
    trees = [("HEAD", ROOT)] + [(Path(c).name, (ROOT / c).resolve()) for c in args.code]
    runs = [(code, tree, v) for code, tree in trees for v in args.variants if code == "HEAD" or v in args.old_variants]
    # the comparisons first (a run stopped at its time limit keeps them): bf16 batched_mm, then the packed variants
    # with each code tree beside, the other bf16 implementation last
    runs.sort(key=lambda r: (r[2].startswith("bf16") and r[2] != "bf16 batched_mm", r[2] != "bf16 batched_mm",
                             r[2] != "packed mix", r[0] != "HEAD"))
    for code, tree, variant in runs:
        env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT / 'eval'}", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, __file__, "--child", variant, "--code-name", code, "--replays", str(args.replays),
               "--rounds", str(args.rounds), "--batch", str(args.batch), "--prompt", str(args.prompt),
               "--new-tokens", str(args.new_tokens), *(["--profile"] if args.profile else []),
               *(["--all-cases"] if args.all_cases else []),
               "--skip-settings", *args.skip_settings]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1].removeprefix("RESULT ")) if lines else dict(
                code=code, variant=variant, error=" | ".join(proc.stderr.strip().splitlines()[-4:])[:600])
        except subprocess.TimeoutExpired:
            row = dict(code=code, variant=variant, error=f"timed out after {args.child_timeout} s")
        row["child_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        (args.out / "gpu_trace.partial.json").write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list[dict], args) -> str:
    lines = [f"# Generation step trace: `python eval/bench_gpu_trace.py {' '.join(sys.argv[1:])}`", "",
             f"refmoe-qwen3; {args.batch} left-padded rows sampled (T 0.8, top-p 0.95) and batch 1 greedy; "
             f"graph replays timed in {args.rounds} interleaved rounds of {args.replays} (median [min-max] ms per "
             "step); e2e = bench_gpu_e2e's (generate 32 - generate 1) / 31.", "",
             "| code | variant | case | step ms | e2e ms |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['code']} | {r['variant']} | failed: {r['error'][:200]} | | |")
            continue
        for k, s in r["step_ms"].items():
            e2e = r["e2e_ms"].get(k)
            lines.append(f"| {r['code']} | {r['variant']} | {k} | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] "
                         f"| {'' if e2e is None else f'{e2e:.3f}'} |")
    checks = [f"{r['code']} {r['variant']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r[
        "graph_equals_eager"].items()) for r in rows if r.get("graph_equals_eager")]
    if checks:
        lines += ["", "Graph tokens == the same steps run eagerly (same seed): " + "; ".join(checks) + "."]
    for r in rows:
        for k, p in (r.get("profile") or {}).items():
            for mode in ("eager", "graph"):
                lines += ["", f"{r['code']} {r['variant']} {k}, {mode}: {p[mode + '_kernels_per_step']} kernels, "
                          f"{p[mode + '_device_us_per_step']} device µs per step; top:"]
                for name, (count, us) in list(p[mode].items())[:12]:
                    lines.append(f"- {us:.1f} µs, {count:g} x `{name[:90]}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", action="store_true", help="CPU: write .gpu_carry/refmoe-qwen3-{bf16,mix,4bit}")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--code", nargs="*", default=[], help="older code trees (folders holding moecompress/)")
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--old-variants", nargs="*", default=["bf16 batched_mm", "packed mix", "packed 4bit"])
    parser.add_argument("--replays", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="kernels of one step (torch.profiler)")
    parser.add_argument("--skip-settings", nargs="*", default=[], help="settings not to run (e.g. dense_gated)")
    parser.add_argument("--all-cases", action="store_true", help="batch 1 greedy under every setting, not only default")
    parser.add_argument("--child-timeout", type=int, default=150)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--code-name", default="HEAD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export:
        export()
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.code_name, args.child, args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_children(args)
    (args.out / "gpu_trace.json").write_text(json.dumps(dict(argv=sys.argv[1:], rows=rows), indent=1))
    text = report(rows, args)
    (args.out / "gpu_trace.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
