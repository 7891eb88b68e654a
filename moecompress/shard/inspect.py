"""`moecompress inspect OUT` for a shard output: placement, bytes per server, expected traffic."""
from __future__ import annotations

import json
from pathlib import Path

from moecompress.format.files import PLACEMENT_FILE


def format_placement(out: str | Path) -> str:
    doc = json.loads((Path(out) / PLACEMENT_FILE).read_text())
    mb = 1 / 2**20
    n = doc["num_servers"]
    lines = [f"placement {out}  method={doc['method']}  servers={n}",
             "| server | experts held (incl. replicas) | replicas | MB used | MB memory |", "|---|---|---|---|---|"]
    for s in range(n):
        held = sum(s in copies for layer in doc["assignment"] for copies in layer)
        replicas = sum(s in copies[1:] for layer in doc["assignment"] for copies in layer)
        lines.append(f"| {s} | {held} | {replicas} | {doc['server_bytes'][s] * mb:.2f} | {doc['memory_bytes'][s] * mb:.2f} |")
    lines.append("experts per layer (primary server): ")
    for layer, experts in enumerate(doc["assignment"]):
        lines.append(f"  layer {layer}: " + " ".join(str(copies[0]) + ("+" if len(copies) > 1 else "")
                                                   for copies in experts))
    traffic = doc.get("traffic")
    if traffic:
        lines.append(f"expected cross-server bytes/token (calibration estimate): {traffic['estimate_bytes_per_token']:.1f}")
        if "replay" in traffic:
            r = traffic["replay"]
            lines.append(f"replayed on held-out routing: {r['bytes_per_token']:.1f} bytes/token, "
                         f"balance {r['balance']:.3f}, local {r['local_fraction']:.1%}")
    return "\n".join(lines)
