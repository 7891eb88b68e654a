"""Several homes computing at once: real gloo processes, one home against two on the same batch.

refmoe-qwen3 at 4 bits (float32 compute), 2 servers, experts alternating, dense weights on both: `homes=(0, 1)`
admits half the sequences at each server, and each server is also the other's expert server. For one home (server
0 admits every sequence) and for two homes, per repetition (interleaved): the wall time of a greedy generation of
B prompts, the greedy tokens (two homes must give one home's tokens exactly: float32, the same model), and how many
of the requests home 1 sent to server 0 were answered while server 0 was computing its own rows (with turn-taking
homes that share is 0; with concurrent homes it is what overlapped). Wall times on a shared 2-core machine are
marked with the load average.

    .venv/bin/python eval/bench_edge_homes.py     # writes eval/results/edge_homes.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))


def bundles(work: Path) -> Path:
    from bench_edge import export_4bit

    from moecompress.artifacts.placement import Placement
    from moecompress.shard.bundles import write_bundles
    from moecompress.shard.command import checkpoint_layer_sizes

    ck = export_4bit(str(ROOT.parent / "shared/models/refmoe-qwen3"), work)
    sizes = checkpoint_layer_sizes(ck)
    L, E = sizes.expert_bytes.shape
    out = work / "homes-expert"
    if not (out / "placement.json").exists():
        write_bundles(ck, Placement(memory_bytes=(10**9,) * 2,
                                    assignment=tuple(tuple(((e % 2),) for e in range(E)) for _ in range(L)),
                                    expert_bytes=sizes.expert_bytes, dense_bytes=sizes.dense_bytes,
                                    dense_servers=(0, 1)), out, overwrite=True)
    return out


def prompts(batch: int, length: int) -> torch.Tensor:
    import gzip

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT.parent / "shared/models/refmoe-qwen3"))
    rows = []
    with gzip.open(ROOT.parent / "shared/data/corpus/eval.jsonl.gz", "rt") as f:
        for line in f:
            ids = tok(json.loads(line)["text"])["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == batch:
                break
    return torch.tensor(rows)


def run(out: Path, homes, ids: torch.Tensor, new_tokens: int) -> dict:
    """One real deployment: wall seconds of one generation, its tokens, and the overlap of server 0's answers to
    home 1 with server 0's own rows."""
    from moecompress.runtime.edge import deploy
    from moecompress.runtime.edge.handlers import PlanServer
    from moecompress.runtime.edge.running import Deployment

    served, own = [], []
    handle, generate = PlanServer.handle, Deployment.generate

    def timed_handle(self, head, payload):  # in this process: server 0's answers to home 1 (ExpertService thread)
        served.append(time.perf_counter())
        return handle(self, head, payload)

    def timed_generate(self, *a, **k):  # in this process: server 0's own rows
        start = time.perf_counter()
        try:
            return generate(self, *a, **k)
        finally:
            own.append((start, time.perf_counter()))

    PlanServer.handle, Deployment.generate = timed_handle, timed_generate
    try:
        with deploy(out, simulate=False, homes=homes, timeout=120) as d:
            d.generate(ids[:, :4], max_new_tokens=2, stop_at_eos=False)  # warm-up
            served.clear(), own.clear()
            start = time.perf_counter()
            tokens = d.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            wall = time.perf_counter() - start
            counts = d.counters.counts()
    finally:
        PlanServer.handle, Deployment.generate = handle, generate
    during = sum(1 for t in served if any(a <= t <= b for a, b in own))
    return {"wall_s": wall, "tokens": tokens, "served_for_home_1": len(served), "served_during_own_rows": during,
            "messages": int(torch.tensor(counts["messages"]).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    t0 = time.time()
    work = Path(tempfile.gettempdir()) / "moecompress-bench-edge"
    work.mkdir(exist_ok=True)
    out = bundles(work)
    ids = prompts(args.batch, args.prompt)
    results = {"one home": [], "two homes": []}
    for _ in range(args.reps):  # interleaved
        for name, homes in (("one home", None), ("two homes", (0, 1))):
            results[name].append(run(out, homes, ids, args.new_tokens))
            print(name, {k: v for k, v in results[name][-1].items() if k != "tokens"}, flush=True)
    same = all(torch.equal(r["tokens"], results["one home"][0]["tokens"]) for rs in results.values() for r in rs)
    rows = []
    for name, rs in results.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rows.append({"homes": name, "wall_s": wall, "tokens_per_s": args.batch * args.new_tokens / wall,
                     "served_for_home_1": rs[-1]["served_for_home_1"],
                     "served_during_own_rows": rs[-1]["served_during_own_rows"], "messages": rs[-1]["messages"]})
    load = os.getloadavg()[0]
    lines = ["| homes | generation s (median) | tokens/s | requests of home 1 answered by server 0 | of them while "
             "server 0 computed its own rows | messages |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['homes']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | {r['served_for_home_1']} | "
                     f"{r['served_during_own_rows']} | {r['messages']} |")
    lines.append(f"\n({time.time() - t0:.0f} s; refmoe-qwen3 4-bit, float32, 2 servers (dense on both, experts "
                 f"alternating), batch {args.batch} x {args.prompt} prompt tokens + {args.new_tokens} greedy tokens, "
                 f"median of {args.reps} interleaved runs, 1 thread per rank; two homes' tokens "
                 f"{'equal' if same else 'DIFFER FROM'} one home's; load average {load:.1f} on 2 cores)")
    Path(args.out, "edge_homes.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "edge_homes.json").write_text(json.dumps({"rows": rows, "same_tokens": same, "load": load},
                                                            indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
