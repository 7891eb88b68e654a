"""Check the time model against real runs: two ranks (gloo) in Linux network namespaces joined by a veth pair.

Each condition sets the link: a rate limit on both veth ends with `tc qdisc ... tbf`, and/or the runtime's own
per-message link emulation (MOECOMPRESS_LINK_DELAY=LATENCY[,RATE], runtime/edge/transport.py: every rank sleeps the
one-way latency before each message it sends -- the home once per send phase -- plus bytes / RATE when a rate is
given). This kernel has no netem, so latency comes only from that emulation (and the veth's own, measured as half
a TCP ping-pong). tbf shapes only the average rate: a message that fits its bucket passes at once, which is why
decoding (0.5-7 KB per message) needs the emulated serialisation to see the rate. For each condition: measured wall
time of a prefill and per decoded token, against the time model (execution/timing.py) = compute + hops x latency +
bytes / rate, where compute is measured in the same setting with no limit and no delay (less its own tiny network
time) and rate is the emulated one if given, else tbf's.

Needs root and `ip netns`; creates namespaces mcplace0/1 (10.231.77.1-2), removes them afterwards (also on errors
and interrupts); skips (exit 0, with the reason) when not root or when they cannot be created. `--budget` bounds the
total time: conditions left when it is spent are skipped and listed.

    .venv/bin/python eval/bench_edge_netns.py     # writes eval/results/edge_netns.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS, VETH, ADDR, PORT = ("mcplace0", "mcplace1"), ("mcpv0", "mcpv1"), ("10.231.77.1", "10.231.77.2"), 29577

HOME = r"""
import json, os, sys, time, torch
from moecompress.runtime.edge import deploy
out, steps, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def _time(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
ids = torch.randint(3, 8000, (1, prompt), generator=torch.Generator().manual_seed(0))
with deploy(out, simulate=False, timeout=120, dtype=torch.bfloat16) as d:
    d(ids[:, :8]); d.generate(ids[:, :8], max_new_tokens=2, stop_at_eos=False)  # warm up
    before = d.counters.counts()
    prefill = min(_time(lambda: d(ids)) for _ in range(3))  # the least disturbed of 3 (shared CPU)
    mid = d.counters.counts()
    short = ids[:, :8]  # decoding after a short prompt: its prefill's noise stays small against the steps
    one = min(_time(lambda: d.generate(short, max_new_tokens=1, stop_at_eos=False)) for _ in range(3))
    c1 = d.counters.counts()
    many = min(_time(lambda: d.generate(short, max_new_tokens=steps + 1, stop_at_eos=False)) for _ in range(3))
    after = d.counters.counts()
def diff(a, b):
    import numpy as np
    return {k: (np.asarray(b[k]) - np.asarray(a[k])).sum().item() for k in ("calls", "tokens", "messages", "bytes", "hops")}
a, b = diff(mid, c1), diff(c1, after)
decode = {k: (b[k] - a[k]) / (3 * steps) for k in a}  # the decode steps alone, per token
p = diff(before, mid)
p = {k: v / 3 for k, v in p.items()}
print("RESULT" + json.dumps({"prefill_s": prefill, "decode_s_per_token": (many - one) / steps,
                             "prefill_counts": p, "decode_counts": decode}))
"""


def sh(*cmd, check=True):
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def setup(rate: str | None) -> None:
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
    for ns, dev, addr in zip(NS, VETH, ADDR):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        if rate:  # a small bucket (1/100 s of traffic, at least 4 KB): messages are shaped, not passed as bursts
            burst = max(4000, int(rate_bytes(rate) / 100))
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
               "latency", "1s")


def teardown() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)


def rate_bytes(rate: str) -> float:
    return {"mbit": 1e6 / 8, "kbit": 1e3 / 8}[rate[-4:]] * float(rate[:-4])


ECHO = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        "s.bind(('{addr}', {port})); s.listen(1); c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, "
        "socket.TCP_NODELAY, 1)\nwhile (b := c.recv(64)): c.sendall(b)")
PINGS = ("import socket, time; s = socket.create_connection(('{addr}', {port}), timeout=10); "
         "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); t = []\nfor _ in range(200):\n"
         "    a = time.perf_counter(); s.sendall(b'x'); s.recv(64); t.append(time.perf_counter() - a)\n"
         "t.sort(); print(t[len(t) // 2])")


def one_way_latency() -> float:
    """Half the median round trip of a 1-byte TCP ping-pong between the namespaces (no ping here)."""
    echo = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-c",
                             ECHO.format(addr=ADDR[1], port=PORT + 1)])
    try:
        time.sleep(0.5)
        out = sh("ip", "netns", "exec", NS[0], sys.executable, "-c", PINGS.format(addr=ADDR[1], port=PORT + 1))
        return float(out.stdout.strip()) / 2
    finally:
        echo.kill()
        echo.wait(timeout=10)


def run(out: Path, steps: int, prompt: int, timeout: float, delay: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOECOMPRESS_LINK_DELAY"}
    if delay:
        env["MOECOMPRESS_LINK_DELAY"] = delay
    env = {**env, "WORLD_SIZE": "2", "MASTER_ADDR": ADDR[0], "MASTER_PORT": str(PORT), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="mcplace-netns-"))
    server = subprocess.Popen(
        ["ip", "netns", "exec", NS[1], sys.executable, "-m", "moecompress.runtime.edge.serve", "--bundles", str(out),
         "--rank", "1", "--world-size", "2", "--init-method", f"tcp://{ADDR[0]}:{PORT}", "--timeout", str(timeout),
         "--dtype", "bfloat16", "--ready", str(tmp / "ready")],
        env={**env, "RANK": "1", "GLOO_SOCKET_IFNAME": VETH[1]}, stdout=subprocess.DEVNULL, stderr=open(tmp / "err", "w"))
    try:
        home = subprocess.run(["ip", "netns", "exec", NS[0], sys.executable, "-c", HOME, str(out), str(steps),
                               str(prompt)], env={**env, "RANK": "0", "GLOO_SOCKET_IFNAME": VETH[0]},
                              capture_output=True, text=True, timeout=timeout * 3)
    finally:
        server.kill()
        server.wait(timeout=30)
    lines = [x for x in home.stdout.splitlines() if x.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"home failed: {home.stderr[-2000:]} / server: {(tmp / 'err').read_text()[-1000:]}")
    return json.loads(lines[0][len("RESULT"):])


def bundles(work: Path) -> dict[str, Path]:
    """2-server bundles of refmoe-qwen3 at 4-bit: expert model (experts alternating, dense on 0), pipeline."""
    from bench_edge import export_4bit

    from moecompress.artifacts.placement import Placement
    from moecompress.shard.bundles import write_bundles
    from moecompress.shard.command import checkpoint_layer_sizes
    from moecompress.shard.layers import place_pipeline
    from moecompress.shard.spec import ServerSpec

    ck = export_4bit(str(ROOT.parent / "shared/models/refmoe-qwen3"), work)
    sizes = checkpoint_layer_sizes(ck)
    L, E = sizes.expert_bytes.shape
    expert = Placement(memory_bytes=(10**9,) * 2, assignment=tuple(tuple(((e % 2),) for e in range(E)) for _ in range(L)),
                       expert_bytes=sizes.expert_bytes, dense_bytes=sizes.dense_bytes, dense_servers=(0,))
    pipe = place_pipeline(sizes.expert_bytes, sizes.moe_decoder_layers, sizes.layer_dense_bytes, sizes.head_bytes,
                          ServerSpec(memory_bytes=(10**9,) * 2))
    outs = {}
    for name, p in (("expert", expert), ("pipeline", pipe)):
        outs[name] = work / f"netns-{name}"
        if not (outs[name] / "placement.json").exists():
            write_bundles(ck, p, outs[name], overwrite=True)
    return outs


CONDITIONS = (  # (name, tbf rate or None, MOECOMPRESS_LINK_DELAY or None); the first is the compute baseline
    ("none", None, None),
    ("tbf 4mbit", "4mbit", None),
    ("delay 5ms", None, "5ms"),
    ("delay 5ms + 20Mbit/s", None, "5ms,20Mbit/s"),
    ("tbf 20mbit + delay 5ms", "20mbit", "5ms"),
)


def delay_parts(delay: str | None) -> tuple[float, float | None]:
    """(emulated one-way latency s, emulated rate bytes/s or None) of a MOECOMPRESS_LINK_DELAY value."""
    from moecompress.runtime.edge.transport import DELAY_ENV, LinkDelay

    if not delay:
        return 0.0, None
    old = os.environ.get(DELAY_ENV)
    os.environ[DELAY_ENV] = delay
    try:
        d = LinkDelay.from_env()
    finally:
        os.environ.pop(DELAY_ENV) if old is None else os.environ.__setitem__(DELAY_ENV, old)
    return d.latency, d.rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--budget", type=float, default=1500.0, help="seconds for all runs; later conditions skipped")
    ap.add_argument("--work", default="/tmp/moecompress-bench-edge")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--modes", default="expert,pipeline", help="execution models to run, in this order")
    ap.add_argument("--conditions", help="comma-separated condition names (default: all)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT/edge_netns.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "eval"))
    conditions = [c for c in CONDITIONS if not args.conditions or c[0] == "none"
                  or c[0] in args.conditions.split(",")]
    if os.geteuid() != 0:
        print("skipped: network namespaces and tc need root (run with sudo)")
        return
    try:
        setup(None)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"skipped: cannot create network namespaces ({getattr(exc, 'stderr', exc)})")
        teardown()
        return
    old = Path(args.out) / "edge_netns.json"
    rows = json.loads(old.read_text()) if args.append and old.exists() else []
    rows = [r for r in rows if "condition" in r]  # rows of this version only
    skipped, t0 = [], time.time()
    try:
        outs = bundles(Path(args.work))
        for mode in args.modes.split(","):
            out, base = outs[mode], None
            for name, rate, delay in conditions:
                if time.time() - t0 > args.budget:
                    skipped.append(f"{mode}: {name}")
                    continue
                setup(rate)
                lat = one_way_latency()
                r = run(out, args.steps, args.prompt, args.timeout, delay)
                pc, dc = r["prefill_counts"], r["decode_counts"]
                if base is None:  # compute = unlimited wall - its own (tiny) network time
                    base = (r["prefill_s"] - pc["hops"] * lat, r["decode_s_per_token"] - dc["hops"] * lat)
                    rows.append({"mode": mode, "condition": name, "latency_ms": lat * 1e3, **r})
                    print(rows[-1], flush=True)
                    continue
                emu_lat, emu_rate = delay_parts(delay)
                per_s = emu_rate or (rate_bytes(rate) if rate else None)
                total_lat = lat + emu_lat
                transfer = (lambda b: b / per_s) if per_s else (lambda b: 0.0)
                rows.append({"mode": mode, "condition": name, "latency_ms": lat * 1e3, "emulated_latency_ms":
                             emu_lat * 1e3, "modeled_rate_bytes_per_s": per_s, **r,
                             "model_prefill_s": base[0] + pc["hops"] * total_lat + transfer(pc["bytes"]),
                             "model_decode_s_per_token": base[1] + dc["hops"] * total_lat + transfer(dc["bytes"])})
                print(rows[-1], flush=True)
    finally:
        teardown()
    lines = ["| model | condition | veth one-way latency ms | prefill s measured / modeled | decode ms/token measured "
             "/ modeled (error) | hops prefill / per decoded token | bytes prefill / per decoded token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        md = r.get("model_decode_s_per_token")
        err = f" ({r['decode_s_per_token'] / md - 1:+.0%})" if md else ""
        lines.append(f"| {r['mode']} | {r['condition']} | {r['latency_ms']:.3f} | {r['prefill_s']:.3f} / "
                     f"{r.get('model_prefill_s', float('nan')):.3f} | {r['decode_s_per_token'] * 1e3:.1f} / "
                     f"{(md or float('nan')) * 1e3:.1f}{err} | {r['prefill_counts']['hops']:.0f} / "
                     f"{r['decode_counts']['hops']:.0f} | {r['prefill_counts']['bytes']:.0f} / "
                     f"{r['decode_counts']['bytes']:.0f} |")
    if skipped:
        lines.append(f"\nSkipped (over --budget {args.budget:g} s): {', '.join(skipped)}")
    lines.append(f"\n({time.time() - t0:.0f} s; {args.steps} decode steps after an 8-token prompt, prefill of "
                 f"{args.prompt} tokens; each the fastest of 3; refmoe-qwen3 4-bit, bf16, 1 thread per rank; load average "
                 f"at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_netns.md").write_text("\n".join(lines) + "\n")
    (out / "edge_netns.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
