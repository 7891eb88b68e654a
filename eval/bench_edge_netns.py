"""Check the time model against real runs: two ranks (gloo) in Linux network namespaces joined by a veth pair.

Each condition sets the link: a rate limit on both veth ends with `tc qdisc ... tbf`, and/or the runtime's own
per-message link emulation (MOECOMPRESS_LINK_DELAY=LATENCY[,RATE], runtime/edge/transport.py: every rank waits
(a sleep, then a spin for the last 100 us) the one-way latency before each message it sends -- the home once per send phase -- plus bytes / RATE when a rate is
given). This kernel has no netem, so latency comes only from that emulation (and the veth's own, measured as half
a TCP ping-pong). tbf shapes only the average rate: a message that fits its bucket passes at once, which is why
decoding (0.5-7 KB per message) needs the emulated serialisation to see the rate. For each condition: measured wall
time per decoded token against the full time model (execution/timing.py, the code `moecompress shard` plans with):
the compute of a ComputeProfile measured just before with `moecompress profile`'s code (bf16, 1 thread) on the
critical path of the run's own counters + hops x latency + bytes / rate. On a shared machine the wall time also
holds the time each rank's thread was runnable but waiting for a CPU; /proc/PID/schedstat counts it (both ranks'
main threads), and "less run-queue waits" subtracts it (an estimate: where the ranks compute at the same time, in
the expert model, a wait may not have delayed the token). Also: the home's own thread CPU time against the model's
home compute, and the older check of the network part alone = compute measured in the same setting with no limit
and no delay (less its own tiny network time) + hops x latency + bytes / rate, where rate is the emulated one if
given, else tbf's. Default conditions: no limit, the LAN profile (tbf 1 Gbit/s + 0.5 ms) and the WAN profile
(tbf 100 Mbit/s + 5 ms); `--conditions all` adds tbf-only and delay-only ones. A condition that fails to start
(a rank missing the rendezvous on a loaded machine) is retried once, then listed as failed.

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS, VETH, ADDR, PORT = ("mcplace0", "mcplace1"), ("mcpv0", "mcpv1"), ("10.231.77.1", "10.231.77.2"), 29577

HOME = r"""
import json, os, sys, time, torch
from moecompress.runtime.edge import deploy
out, steps, prompt, server = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cpu, waited = [], []  # per timed call: the home's main-thread CPU s; both ranks' main threads' run-queue wait s
def _runqueue():  # seconds the home's and the server's main threads spent runnable, waiting for a CPU
    return sum(int(open(f"/proc/{p}/schedstat").read().split()[1]) for p in (os.getpid(), server)) / 1e9
def _time(fn):  # the home's CPU less the link emulation's spins (the link's time, not the home's work)
    t0, c0, w0, h0 = time.perf_counter(), time.thread_time(), _runqueue(), d.transport.delay_cpu_seconds; fn()
    cpu.append(time.thread_time() - c0 - (d.transport.delay_cpu_seconds - h0)); waited.append(_runqueue() - w0)
    return time.perf_counter() - t0
ids = torch.randint(3, 8000, (1, prompt), generator=torch.Generator().manual_seed(0))
with deploy(out, simulate=False, timeout=120, dtype=torch.bfloat16) as d:
    d(ids[:, :8]); d.generate(ids[:, :8], max_new_tokens=2, stop_at_eos=False)  # warm up
    before = d.counters.counts()
    prefill = min(_time(lambda: d(ids)) for _ in range(3))  # the least disturbed of 3 (shared CPU)
    mid = d.counters.counts()
    short = ids[:, :8]  # decoding after a short prompt: its prefill's noise stays small against the steps
    cpu.clear(); waited.clear()
    walls = [_time(lambda: d.generate(short, max_new_tokens=1, stop_at_eos=False)) for _ in range(3)]
    c1 = d.counters.counts()
    walls += [_time(lambda: d.generate(short, max_new_tokens=steps + 1, stop_at_eos=False)) for _ in range(3)]
    one, many = min(walls[:3]), min(walls[3:])
    home_cpu = (min(cpu[3:]) - min(cpu[:3])) / steps
    net = [w - q for w, q in zip(walls, waited)]  # wall less the ranks' run-queue waits (the shared CPU's load)
    unloaded = (min(net[3:]) - min(net[:3])) / steps
    after = d.counters.counts()
def diff(a, b):
    import numpy as np
    return {k: (np.asarray(b[k]) - np.asarray(a[k])).sum().item() for k in ("calls", "tokens", "messages", "bytes", "hops")}
import numpy as np
a, b = diff(mid, c1), diff(c1, after)
decode = {k: (b[k] - a[k]) / (3 * steps) for k in a}  # the decode steps alone, per token
p = diff(before, mid)
p = {k: v / 3 for k, v in p.items()}
print("RESULT" + json.dumps({"prefill_s": prefill, "decode_s_per_token": (many - one) / steps,
                             "decode_home_cpu_s_per_token": home_cpu, "decode_s_per_token_less_waits": unloaded,
                             "prefill_counts": p, "decode_counts": decode, "decode_calls": b["calls"] - a["calls"],
                             "counters": [x for x in (mid, c1, after)]}, default=lambda v: np.asarray(v).tolist()))
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
    return {"gbit": 1e9 / 8, "mbit": 1e6 / 8, "kbit": 1e3 / 8}[rate[-4:]] * float(rate[:-4])


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
                               str(prompt), str(server.pid)],  # `ip netns exec` execs: the server's own pid
                              env={**env, "RANK": "0", "GLOO_SOCKET_IFNAME": VETH[0]},
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
    return outs, ck


CONDITIONS = (  # (name, tbf rate or None, MOECOMPRESS_LINK_DELAY or None); the first is the compute baseline
    ("none", None, None),
    ("lan: tbf 1gbit + delay 0.5ms", "1gbit", "0.5ms"),  # the time model's LAN and WAN profiles
    ("wan: tbf 100mbit + delay 5ms", "100mbit", "5ms"),
    ("tbf 4mbit", "4mbit", None),
    ("delay 5ms", None, "5ms"),
    ("delay 5ms + 20Mbit/s", None, "5ms,20Mbit/s"),
    ("tbf 20mbit + delay 5ms", "20mbit", "5ms"),
)
DEFAULT_CONDITIONS = ("none", "lan: tbf 1gbit + delay 0.5ms", "wan: tbf 100mbit + delay 5ms")


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


def decode_counters(counts: list[dict]):
    """Counters of the decode steps alone from the counts at (mid, c1, after): (after - c1) - (c1 - mid) = the
    3 x `steps` decode calls of the long generations less the 3 short ones."""
    from moecompress.execution.counters import Counters

    mid, c1, after = counts
    arr = {k: np.asarray(after[k]) - 2 * np.asarray(c1[k]) + np.asarray(mid[k])
           for k in ("messages", "bytes", "hops", "pairs")}
    L, N = arr["pairs"].shape
    c = Counters(N, L)
    for k, v in arr.items():
        setattr(c, k, v.astype(np.int64).reshape(getattr(c, k).shape))
    c.calls = after["calls"] - 2 * c1["calls"] + mid["calls"]
    c.tokens = after["tokens"] - 2 * c1["tokens"] + mid["tokens"]
    return c


def time_model(placement, counters, profile, latency: float, rate: float | None) -> dict:
    """The time model's decode seconds per call (execution/timing.py: the profile's compute on the critical path
    + hops x latency + bytes / rate), the same code `moecompress shard` plans with, and its parts."""
    from moecompress.execution.timing import LinkProfile, modeled_time, profile_compute

    link = LinkProfile("run", rate or 1e30, latency)
    t = modeled_time(counters, link, profile_compute(placement, counters, profile) * counters.calls)
    return {k: getattr(t, k) / counters.calls for k in ("seconds", "compute", "latency", "transfer")}


def home_compute(placement, counters, profile) -> float:
    """The part of the time model's compute per call that the home's own thread runs (pipeline: the head and its
    stage's layers; expert model: the head, every layer but its experts, its dispatch and its share of the pairs)."""
    from dataclasses import replace

    from moecompress.execution.timing import add_dispatch

    home = placement.home
    if placement.mode == "pipeline":
        return profile.head_seconds + profile.generate_seconds + sum(
            t for t, s in zip(profile.layer_seconds, placement.layer_servers) if s == home)
    pairs = counters.pairs.astype(np.float64)
    share = pairs[:, home] / np.maximum(pairs.sum(1), 1)
    rows = [[0.0] * placement.num_servers for _ in profile.moe_seconds]
    without_transport = replace(profile, transport_seconds=0.0)  # a wall time, not the home thread's CPU
    return (profile.head_seconds + profile.generate_seconds + sum(profile.layer_seconds) - sum(profile.moe_seconds)
            + add_dispatch(rows, home, counters, without_transport) + float(np.dot(profile.moe_seconds, share)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--budget", type=float, default=1500.0, help="seconds for all runs; later conditions skipped")
    ap.add_argument("--work", default="/tmp/moecompress-bench-edge")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--modes", default="expert,pipeline", help="execution models to run, in this order")
    ap.add_argument("--conditions", help="comma-separated condition names, or all (default: none + the LAN and "
                    "WAN profiles)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT/edge_netns.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "eval"))
    wanted = DEFAULT_CONDITIONS if not args.conditions else [c[0] for c in CONDITIONS] \
        if args.conditions == "all" else args.conditions.split(",")
    conditions = [c for c in CONDITIONS if c[0] == "none" or c[0] in wanted]
    if os.geteuid() != 0:
        print("skipped: network namespaces and tc need root (run with sudo)")
        return
    try:
        setup(None)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"skipped: cannot create network namespaces ({getattr(exc, 'stderr', exc)})")
        teardown()
        return
    import torch

    from moecompress.artifacts.placement import Placement
    from moecompress.shard.profile import measure_profile

    torch.set_num_threads(1)  # as each rank: 1 thread
    old = Path(args.out) / "edge_netns.json"
    rows = json.loads(old.read_text()) if args.append and old.exists() else []
    rows = [r for r in rows if "condition" in r]  # rows of this version only
    skipped, t0 = [], time.time()
    try:
        outs, ck = bundles(Path(args.work))
        for mode in args.modes.split(","):
            out, base = outs[mode], None
            placement = Placement.load(out / "placement.json")
            # the time model's compute: `moecompress profile`'s measurement (bf16, 1 thread, thread CPU time, min
            # of 5) of a decode step in the middle of the run's decoding (8-token prompt + steps)
            profile = measure_profile(ck, batch=1, context=8 + args.steps // 2, reps=5, dtype=torch.bfloat16)
            for name, rate, delay in conditions:
                if time.time() - t0 > args.budget:
                    skipped.append(f"{mode}: {name}")
                    continue
                setup(rate)
                lat = one_way_latency()
                r = None
                for attempt in range(2):  # a rank that misses the rendezvous on a loaded machine: once more
                    try:
                        r = run(out, args.steps, args.prompt, args.timeout, delay)
                        break
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"{mode}: {name}: attempt {attempt + 1} failed: {str(exc)[-300:]}", flush=True)
                        failure = str(exc).strip().splitlines()[-1][:200]
                if r is None:  # failed twice: say so, go on
                    skipped.append(f"{mode}: {name} (failed twice: {failure})")
                    continue
                pc, dc = r["prefill_counts"], r["decode_counts"]
                emu_lat, emu_rate = delay_parts(delay)
                per_s = emu_rate or (rate_bytes(rate) if rate else None)
                total_lat = lat + emu_lat
                counters = decode_counters(r.pop("counters"))
                full = time_model(placement, counters, profile, total_lat, per_s)
                row = {"mode": mode, "condition": name, "latency_ms": lat * 1e3, "emulated_latency_ms":
                       emu_lat * 1e3, "modeled_rate_bytes_per_s": per_s, **r, "time_model_decode": full,
                       "measured_over_time_model": r["decode_s_per_token"] / full["seconds"],
                       "less_waits_over_time_model": r["decode_s_per_token_less_waits"] / full["seconds"],
                       "profile_compute_s": full["compute"], "load_average": os.getloadavg()[0],
                       "home_compute_s": home_compute(placement, counters, profile),
                       "profile_transport_s": profile.transport_seconds,
                       "profile_generate_s": profile.generate_seconds}
                if name == "none":  # compute = unlimited wall - its own (tiny) network time
                    base = (r["prefill_s"] - pc["hops"] * lat, r["decode_s_per_token"] - dc["hops"] * lat)
                elif base is not None:
                    transfer = (lambda b: b / per_s) if per_s else (lambda b: 0.0)
                    row.update(model_prefill_s=base[0] + pc["hops"] * total_lat + transfer(pc["bytes"]),
                               model_decode_s_per_token=base[1] + dc["hops"] * total_lat + transfer(dc["bytes"]))
                rows.append(row)
                print({k: v for k, v in row.items() if "counts" not in k}, flush=True)
    finally:
        teardown()
    lines = ["| model | condition | decode ms/token measured | time model (profile compute + latency + transfer) | "
             "measured / time model | measured less run-queue waits (/ model) | home CPU ms/token (its thread) / model's home compute | network part: "
             "measured compute + latency + transfer (error) | prefill s "
             "measured / modeled | hops / bytes per decoded token | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md = r.get("model_decode_s_per_token")
        err = f" ({r['decode_s_per_token'] / md - 1:+.0%})" if md else ""
        tm = r.get("time_model_decode")
        tm_cell = (f"{tm['seconds'] * 1e3:.1f} ({tm['compute'] * 1e3:.1f} + {tm['latency'] * 1e3:.1f} + "
                   f"{tm['transfer'] * 1e3:.2f})" if tm else "-")
        ratio = f"{r['measured_over_time_model']:.2f}" if tm else "-"
        hc = r.get("decode_home_cpu_s_per_token")
        home = f"{hc * 1e3:.1f} / {r['home_compute_s'] * 1e3:.1f}" if hc is not None and "home_compute_s" in r else "-"
        lw = r.get("decode_s_per_token_less_waits")
        less = f"{lw * 1e3:.1f} ({r['less_waits_over_time_model']:.2f})" if lw is not None and tm else "-"
        lines.append(f"| {r['mode']} | {r['condition']} | {r['decode_s_per_token'] * 1e3:.1f} | {tm_cell} | {ratio} | "
                     f"{less} | {home} | "
                     f"{(md or float('nan')) * 1e3:.1f}{err} | {r['prefill_s']:.3f} / "
                     f"{r.get('model_prefill_s', float('nan')):.3f} | {r['decode_counts']['hops']:.0f} / "
                     f"{r['decode_counts']['bytes']:.0f} | {r.get('load_average', float('nan')):.1f} |")
    parts = {r["mode"]: (r["profile_transport_s"], r["profile_generate_s"]) for r in rows if "profile_transport_s" in r}
    if parts:
        lines.append("\nProfile parts (last run of each model): " + "; ".join(
            f"{m}: transport round trip {t * 1e3:.2f} ms, generation step {g * 1e3:.2f} ms"
            for m, (t, g) in parts.items()))
    if skipped:
        lines.append(f"\nSkipped (over --budget {args.budget:g} s, or failed): {'; '.join(skipped)}")
    lines.append(f"\n({time.time() - t0:.0f} s; {args.steps} decode steps after an 8-token prompt, prefill of "
                 f"{args.prompt} tokens; each the fastest of 3; refmoe-qwen3 4-bit, bf16, 1 thread per rank; 2 ranks "
                 f"in network namespaces joined by a veth pair; latency from the runtime's link emulation "
                 f"(MOECOMPRESS_LINK_DELAY), rate from tc tbf on both veth ends; load average at the end "
                 f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_netns.md").write_text("\n".join(lines) + "\n")
    (out / "edge_netns.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
