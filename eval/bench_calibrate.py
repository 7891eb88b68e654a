"""Calibration cost on the reference model: wall time against a plain forward over the same tokens, and peak memory
of whole-model against layer-by-layer calibration.

    python eval/bench_calibrate.py [--model ../shared/models/refmoe-qwen3]
        [--data ../shared/data/corpus/calib.jsonl.gz] [--samples 64] [--seq-len 256] [--batch-size 8]
        [--repeats 3] [--threads N] [--dtype float32]

Timing (one process, model loaded once, float32 by default): every condition runs `--repeats` times, interleaved,
and the fastest run is reported (least disturbed by other work on the machine). Conditions: the plain forward of
the causal LM (logits, as a user runs it), the same without the LM head (what calibration runs), calibration
without Hessians (counts, co-activation, paths) and with Hessians (per-expert gate_up/down, plain and weighted).
Memory: each mode in its own process, started through a small launcher so that ru_maxrss is the child's own
(Linux carries a parent's high-water mark into a child it execs); the baseline process loads everything but the
weights (torch, transformers, the architecture's code, a meta-device skeleton).
Prints a markdown table. Paths default to ../shared relative to the repository root.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _child(args) -> None:
    """One memory measurement: mode baseline | whole | layerwise; prints {"maxrss_mb", "seconds"}."""
    import torch

    _set_threads(args.threads)
    t0 = time.perf_counter()
    from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate

    if args.child == "baseline":
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        torch.randn(256, 256) @ torch.randn(256, 256)
    else:
        saved = torch.load(args.data_file)
        data = CalibrationData(saved["input_ids"], saved["attention_mask"], saved["domain_ids"],
                               tuple(saved["domains"]), saved["description"])
        with tempfile.TemporaryDirectory() as hdir:
            calibrate(args.model, None, data, CalibrationOptions(
                batch_size=args.batch_size, dtype=args.dtype, progress=False, layerwise=args.child == "layerwise",
                hessian_dir=hdir if args.child == "layerwise" else None))
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - t0}))


def _run_child(args, mode: str, data_file: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", str(args.model),
           "--data-file", str(data_file), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timings(args, data) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.calibrate import CalibrationOptions, calibrate
    from moecompress.calibrate.options import DTYPES

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=DTYPES[args.dtype]).eval()
    batches = [(ids, mask) for ids, mask, _ in data.batches(args.batch_size)]

    def forward(base: bool):
        def run():
            with torch.no_grad():
                for ids, mask in batches:
                    (model.base_model if base else model)(input_ids=ids, attention_mask=mask, use_cache=False)
        return run

    def calib(hessians: bool):
        opts = CalibrationOptions(batch_size=args.batch_size, hessians=hessians, progress=False)
        return lambda: calibrate(model, None, data, opts)

    conds = {"forward (causal LM, logits)": forward(False), "forward (no LM head)": forward(True),
             "calibrate, no Hessians": calib(False), "calibrate, with Hessians": calib(True)}
    best = {k: float("inf") for k in conds}
    for k, fn in conds.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for k, fn in conds.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared" / "models" / "refmoe-qwen3")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "corpus" / "calib.jsonl.gz")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", choices=["baseline", "whole", "layerwise"], help=argparse.SUPPRESS)
    ap.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    import torch
    from transformers import AutoTokenizer

    from moecompress.calibrate import build_calibration_data

    _set_threads(args.threads)
    data = build_calibration_data(args.data, AutoTokenizer.from_pretrained(str(args.model)), args.samples,
                                  args.seq_len, seed=0)
    tokens = int(data.attention_mask.sum())
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "data.pt"
        torch.save({"input_ids": data.input_ids, "attention_mask": data.attention_mask,
                    "domain_ids": data.domain_ids, "domains": list(data.domains),
                    "description": data.description}, data_file)
        mem = {mode: _run_child(args, mode, data_file) for mode in ("baseline", "whole", "layerwise")}
    t = _timings(args, data)
    size_mb = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 2**20

    fwd, base = t["forward (causal LM, logits)"], t["forward (no LM head)"]
    print(f"## Calibration cost: {args.model.name}, {args.samples} x {args.seq_len} = {tokens} tokens, "
          f"batch {args.batch_size}, {args.dtype}, torch threads {torch.get_num_threads()}\n")
    print("| run | seconds (best of %d) | x forward (causal LM) | x forward (no LM head) |" % args.repeats)
    print("|---|---:|---:|---:|")
    for k, v in t.items():
        print(f"| {k} | {v:.2f} | {v / fwd:.2f} | {v / base:.2f} |")
    print(f"\n| process (checkpoint {size_mb:.0f} MB on disk) | peak RSS MB | above baseline MB | seconds |")
    print("|---|---:|---:|---:|")
    b = mem["baseline"]["maxrss_mb"]
    names = {"baseline": "baseline (no weights loaded)", "whole": "whole-model calibration",
             "layerwise": "layer-by-layer calibration"}
    for mode, r in mem.items():
        print(f"| {names[mode]} | {r['maxrss_mb']:.0f} | {r['maxrss_mb'] - b:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
