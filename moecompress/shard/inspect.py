"""`moecompress inspect OUT` for a shard output: placement, bytes per server, expected traffic."""
from __future__ import annotations

import json
from pathlib import Path

from moecompress.format.files import PLACEMENT_FILE


def format_placement(out: str | Path) -> str:
    doc = json.loads((Path(out) / PLACEMENT_FILE).read_text())
    mb = 1 / 2**20
    n = doc["num_servers"]
    mode = doc.get("mode", "expert")
    lines = [f"placement {out}  mode={mode}  method={doc['method']}  servers={n}  home={doc.get('home')}",
             "| server | experts held (incl. replicas) | replicas | MB used | MB memory |", "|---|---|---|---|---|"]
    for s in range(n):
        held = sum(s in copies for layer in doc["assignment"] for copies in layer)
        replicas = sum(s in copies[1:] for layer in doc["assignment"] for copies in layer)
        lines.append(f"| {s} | {held} | {replicas} | {doc['server_bytes'][s] * mb:.2f} | {doc['memory_bytes'][s] * mb:.2f} |")
    if mode == "pipeline":
        lines.append("decoder layer -> server: " + " ".join(str(s) for s in doc["layer_servers"]))
    lines.append("experts per layer (primary server): ")
    for layer, experts in enumerate(doc["assignment"]):
        lines.append(f"  layer {layer}: " + " ".join(str(copies[0]) + ("+" if len(copies) > 1 else "")
                                                   for copies in experts))
    replayed = (doc.get("traffic") or {}).get("replay") or {}
    for name, r in replayed.items():
        lines.append(f"replayed held-out text ({name}, {r['calls']} calls): {r['bytes_per_token']:.1f} bytes/token, "
                     f"{r['hops_per_call']:.2f} one-way hops per call, balance summed {r['balance']:.3f}, "
                     f"worst layer {r['layer_balance']:.3f}")
    copies = (doc.get("traffic") or {}).get("home_copies")
    if copies:  # shard --home-copies (shard/home_copies.py)
        high = copies.get("high")  # mixed-bit: the hottest at high bits on a share of the budget
        width = (f"{high['bits']}/{copies['bits']}-bit mixed, {high['bits']}-bit on a share {high['share']:g}"
                 if high else f"{copies['bits']}-bit")
        lines.append(f"home copies ({width}, budget {copies['budget']:g} x a server's expert bytes; "
                     "server-K/home-copies/): " + ", ".join(
                         f"home {h}: {c['experts']} experts"
                         + (f" ({c['high_experts']} at {high['bits']} bits)" if high else "")
                         + f", {c['bytes'] * mb:.2f} MB" for h, c in copies["homes"].items()))
    return "\n".join(lines)
