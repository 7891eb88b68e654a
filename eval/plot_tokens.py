"""Round trips per decoded token vs Δppl across placements: the layer-level token policies (localize, prune_layer)
and the combinations of several eval/bench_tokens.py runs (one per placement) in one plot, in absolute round trips
and relative to shard's default placement's lossless count.

    .venv/bin/python eval/plot_tokens.py tokens tokens_home4 tokens_home8fit --out tokens_placements
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def label(doc: dict) -> str:
    a = doc["args"]
    if not a.get("home_replicas"):
        return "default placement"
    extra = doc.get("home_extra_bytes", 0)
    bits = f" at {a['home_bits']} bits" if a.get("home_bits") else ""
    return f"home replicas {a['home_replicas']}{bits}" + (f" (+{extra / 2**20:.2f} MiB home)" if extra else
                                                           " (equal memory)")


def dppl(r: dict) -> float:
    """Δppl % against the default placement's lossless run (runs before it was measured: against their own
    lossless run, the same bits, so the same outputs up to float order)."""
    return r.get("dppl_default", r["dppl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="stems of eval/results/<name>.json written by bench_tokens.py")
    ap.add_argument("--results", default=str(ROOT / "eval/results"))
    ap.add_argument("--out", default="tokens_placements")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads((Path(args.results) / f"{n}.json").read_text()) for n in args.names]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"localize": "o-", "localize_gap": "D-", "prune_layer": "s--", "combined": "^"}
    for i, doc in enumerate(docs):
        base = doc["replayed_round_trips"]["default"]
        color = f"C{i}"
        lossless = next(r for r in doc["results"] if r["spec"] == "native")
        ax.plot([dppl(lossless)], [lossless["round_trips_per_token"] / base], "*", color=color, ms=10)
        for curve, style in markers.items():
            rows = [r for r in doc["results"] if r["curve"] == curve and dppl(r) < 20]
            if rows:
                ax.plot([dppl(r) for r in rows], [r["round_trips_per_token"] / base for r in rows], style,
                        color=color, label=f"{label(doc)}: {curve}", ms=4)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("Δ perplexity % vs the default placement's lossless deployment")
    ax.set_ylabel("round trips per decoded token / default placement lossless")
    ax.set_title(f"{Path(docs[0]['args']['model']).name}: star = lossless of each placement")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(args.results) / f"{args.out}.png", dpi=120)
    print(f"wrote {Path(args.results) / f'{args.out}.png'}")


if __name__ == "__main__":
    main()
