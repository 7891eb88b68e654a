"""The time model's network part against the runtime's real exchange in network namespaces, without model compute.

Two ranks in namespaces joined by a veth pair (as bench_edge_netns.py, own names mclink0/1, 10.231.78.1-2): the
home sends expert-model requests through the runtime's TorchDistributed transport, the other rank answers them in
the runtime's `serve` loop with a reply of the real size (no compute). Per condition (tbf rate on both veth ends
and/or the runtime's MOECOMPRESS_LINK_DELAY emulation) and message size (1 row: a decoded token; 128 rows: a
prefill chunk), the median wall time of a round trip against the model: 2 x one-way latency (veth + emulated) +
(request + reply bytes) / rate. Needs root; removes its namespaces; skips with the reason otherwise.

    .venv/bin/python eval/bench_edge_link.py     # writes eval/results/edge_link.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

import bench_edge_netns as netns  # noqa: E402

netns.NS, netns.VETH, netns.ADDR, netns.PORT = ("mclink0", "mclink1"), ("mclv0", "mclv1"), \
    ("10.231.78.1", "10.231.78.2"), 29677

RANK = r"""
import json, statistics, sys, time, torch
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.transport import TorchDistributed, init_group
rank, init, rows, hidden, top_k, trips = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
device = init_group(init, int(rank), 2, 60.0)
class Echo:  # the reply an expert server sends: rows x hidden bf16, no compute
    def handle(self, head, payload):
        return [(0, None, torch.zeros(head[2] * head[5] * 2, dtype=torch.uint8))]
    def control(self, op): pass
    def stats(self): return [0.0, 0.0, 0.0]
if rank == "1":
    from moecompress.runtime.edge.serve import serve
    serve(Echo(), 1, 0, None, 0, 2, device)
else:
    t = TorchDistributed(0, 2, 60.0, device)
    head = wire.request_header(0, rows, top_k, torch.bfloat16, hidden)
    payload = torch.zeros(wire.request_payload_bytes(rows, hidden, top_k, torch.bfloat16), dtype=torch.uint8)
    times = []
    for i in range(trips + 5):
        a = time.perf_counter()
        t.expect(1, rows * hidden * 2)  # as the dispatcher does
        t.request(1, head, payload)
        t.reply(1, rows * hidden * 2)
        times.append(time.perf_counter() - a)
    t.close()
    times = sorted(times[5:])
    print("RESULT" + json.dumps({"median_s": statistics.median(times), "p10_s": times[len(times) // 10],
                                 "request_bytes": int(head.numel() * 8 + payload.numel()),
                                 "reply_bytes": rows * hidden * 2}))
"""


def trip(rows: int, hidden: int, top_k: int, trips: int, delay: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOECOMPRESS_LINK_DELAY"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **({"MOECOMPRESS_LINK_DELAY": delay} if delay else {}))
    init = f"tcp://{netns.ADDR[0]}:{netns.PORT}"
    args = [init, str(rows), str(hidden), str(top_k), str(trips)]
    server = subprocess.Popen(["ip", "netns", "exec", netns.NS[1], sys.executable, "-c", RANK, "1", *args],
                              env={**env, "GLOO_SOCKET_IFNAME": netns.VETH[1]}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        home = subprocess.run(["ip", "netns", "exec", netns.NS[0], sys.executable, "-c", RANK, "0", *args],
                              env={**env, "GLOO_SOCKET_IFNAME": netns.VETH[0]}, capture_output=True, text=True,
                              timeout=180)
    finally:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    lines = [x for x in home.stdout.splitlines() if x.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"home failed: {home.stderr[-1500:]}")
    return json.loads(lines[0][len("RESULT"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="refmoe-qwen3's hidden size")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--trips", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("skipped: network namespaces and tc need root (run with sudo)")
        return
    try:
        netns.setup(None)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"skipped: cannot create network namespaces ({getattr(exc, 'stderr', exc)})")
        netns.teardown()
        return
    rows_out, t0 = [], time.time()
    try:
        for name, rate, delay in netns.CONDITIONS:
            netns.setup(rate)
            lat = netns.one_way_latency()
            emu_lat, emu_rate = netns.delay_parts(delay)
            per_s = emu_rate or (netns.rate_bytes(rate) if rate else None)
            for rows in (1, 128):
                r = trip(rows, args.hidden, args.top_k, args.trips, delay)
                nbytes = r["request_bytes"] + r["reply_bytes"]
                model = 2 * (lat + emu_lat) + (nbytes / per_s if per_s else 0.0)
                rows_out.append({"condition": name, "rows": rows, "latency_ms": lat * 1e3, "bytes": nbytes,
                                 "measured_ms": r["median_s"] * 1e3, "p10_ms": r["p10_s"] * 1e3,
                                 "model_ms": model * 1e3})
                print(rows_out[-1], flush=True)
    finally:
        netns.teardown()
    lines = ["| condition | rows per message | bytes per round trip | round trip ms: measured median (p10) / "
             "modeled | error |", "|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['condition']} | {r['rows']} | {r['bytes']} | {r['measured_ms']:.2f} ({r['p10_ms']:.2f}) "
                     f"/ {r['model_ms']:.2f} | {r['measured_ms'] / r['model_ms'] - 1:+.0%} |")
    lines.append(f"\n({time.time() - t0:.0f} s; {args.trips} round trips each, median; hidden {args.hidden}, top-k "
                 f"{args.top_k}, bf16: the sizes of refmoe-qwen3's expert-model messages; machine load average "
                 f"{os.getloadavg()[0]:.1f} on 2 cores)")
    out = Path(args.out)
    (out / "edge_link.md").write_text("\n".join(lines) + "\n")
    (out / "edge_link.json").write_text(json.dumps(rows_out, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
