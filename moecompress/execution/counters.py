"""Counters of a deployment's traffic, load, time and memory: what the runtime sends, counted where it sends it.

The runtime's dispatcher and the placement stage's replay call the same `add_*` methods with the same arguments,
so their counts are identical by construction. The wire format is fixed here (see `expert_message_bytes` and
`pipeline_hop_bytes`); one message is one header (when the protocol sends one) plus its payload.

Token policies (`execution/tokens`, off by default) are counted per MoE layer next to the traffic: pairs pruned and
substituted, token rows before fusion and rows saved by fusion, tokens needing a remote server (with and without
the policies: at batch 1 each is one round trip), hops saved (calls whose layer became local), and bytes by payload
precision. With no policy (`token_policy == "none"`) `counts()` is exactly the lossless runtime's.

Critical path: `hops` counts sequential one-way network transfers per forward call (an expert-model MoE layer with
any remote server costs 2: the requests go out in parallel, the replies come back in parallel; a pipeline hop
costs 1). Round trips = hops / 2.
"""
from __future__ import annotations

import json

import numpy as np

from moecompress.errors import MoecompressError

HEADER_INTS = 8  # int64 fields of a request header: op, layer, rows, top_k, 4 spare/op-specific
HEADER_BYTES = HEADER_INTS * 8
TOKEN_FIELDS = ("pruned_pairs", "substituted_pairs", "token_rows", "fused_rows", "remote_tokens",
                "lossless_remote_tokens", "saved_hops", "copy_pairs")  # copy_pairs: computed with home low-bit copies
ID_BYTES, WEIGHT_BYTES = 4, 4  # int32 expert ids and float32 routing weights of every request row


def expert_message_bytes(rows: int, hidden_size: int, top_k: int, elem_bytes: int) -> tuple[int, int]:
    """(request, reply) bytes of one expert-model exchange of `rows` token rows with one server."""
    if rows <= 0:
        return 0, 0
    request = HEADER_BYTES + rows * (hidden_size * elem_bytes + top_k * (ID_BYTES + WEIGHT_BYTES))
    return request, rows * hidden_size * elem_bytes


def pipeline_hop_bytes(tokens: int, hidden_size: int, elem_bytes: int, mask_elems: int) -> int:
    """Bytes of one pipeline hop: header, hidden [tokens, H], the 2-D attention mask (int8), positions (int32)."""
    return HEADER_BYTES + tokens * hidden_size * elem_bytes + mask_elems + tokens * 4


class Counters:
    """Per MoE/decoder layer and per link accumulations of a run (mutable; the runtime owns one per deployment)."""

    def __init__(self, num_servers: int, num_layers: int):
        if num_servers < 1 or num_layers < 0:
            raise MoecompressError("counters need at least one server and a non-negative number of layers")
        N, L = num_servers, num_layers
        self.num_servers, self.num_layers = N, L
        self.calls = 0  # forward calls
        self.tokens = 0  # token rows processed (padding included)
        self.messages = np.zeros((L, N, N), np.int64)  # [layer, src, dst]
        self.bytes = np.zeros((L, N, N), np.int64)
        self.hops = np.zeros(L, np.int64)  # sequential one-way hops, summed over calls
        self.pairs = np.zeros((L, N), np.int64)  # routed (token, expert) pairs computed per server
        self.exchange_seconds = np.zeros(N)
        self.compute_seconds = np.zeros(N)
        self.peak_memory_bytes = np.zeros(N, np.int64)
        self.token_policy = "none"  # the spec of the token policies in use
        self.token = {name: np.zeros(L, np.int64) for name in TOKEN_FIELDS}  # per MoE layer
        self.bytes_by_precision: dict[str, int] = {}

    def add_call(self, tokens: int) -> None:
        """One forward call of `tokens` token rows (a decode step of B sequences: B rows)."""
        self.calls += 1
        self.tokens += int(tokens)

    def add_expert_exchange(self, layer: int, home: int, rows, pairs, hidden_size: int, top_k: int,
                            elem_bytes: int) -> None:
        """One expert-model MoE layer: rows[n] token rows sent to server n (0 for the home), pairs[n] computed."""
        rows = [int(r) for r in rows]
        messages = [(n, *expert_message_bytes(r, hidden_size, top_k, elem_bytes)) for n, r in enumerate(rows)
                    if n != home and r > 0]
        self.add_exchange(layer, home, messages, pairs)

    def add_exchange(self, layer: int, home: int, messages, pairs, dispatch_precision: str = "native",
                     return_precision: str = "native") -> None:
        """One expert-model MoE layer of any wire format: messages [(server, request bytes, reply bytes)] (one request
        and one reply each), pairs[n] computed on server n."""
        self.pairs[layer] += np.asarray(pairs, np.int64)
        remote = False
        for n, request, reply in messages:
            if n == home or request <= 0:
                continue
            self._send(layer, home, n, request)
            self._send(layer, n, home, reply)
            for precision, nbytes in ((dispatch_precision, request), (return_precision, reply)):
                self.bytes_by_precision[precision] = self.bytes_by_precision.get(precision, 0) + int(nbytes)
            remote = True
        if remote:
            self.hops[layer] += 2

    def add_token_stats(self, layer: int, stats: dict) -> None:
        """Token-policy counts of one MoE layer of one call (`execution.tokens.traffic.token_stats`)."""
        for name in TOKEN_FIELDS:
            self.token[name][layer] += int(stats[name])

    def add_stage_hop(self, layer: int, src: int, dst: int, tokens: int, hidden_size: int, elem_bytes: int,
                      mask_elems: int) -> None:
        """One pipeline hop src -> dst carrying the hidden state of `tokens` rows, charged to decoder layer `layer`
        (the first layer of the receiving stage; the hop back to the home is charged to the last layer)."""
        self._send(layer, src, dst, pipeline_hop_bytes(tokens, hidden_size, elem_bytes, mask_elems))
        self.hops[layer] += 1

    def add_stage_return(self, layer: int, src: int, dst: int, tokens: int, hidden_size: int,
                         elem_bytes: int) -> None:
        """The last stage's hop back to the home: the final hidden state only (no header), charged to the last layer."""
        self._send(layer, src, dst, tokens * hidden_size * elem_bytes)
        self.hops[layer] += 1

    def add_stage_pairs(self, layer: int, server: int, pairs: int) -> None:
        self.pairs[layer, server] += int(pairs)

    def add_time(self, server: int, exchange: float = 0.0, compute: float = 0.0) -> None:
        self.exchange_seconds[server] += exchange
        self.compute_seconds[server] += compute

    def note_memory(self, server: int, peak_bytes: int) -> None:
        self.peak_memory_bytes[server] = max(int(self.peak_memory_bytes[server]), int(peak_bytes))

    def _send(self, layer: int, src: int, dst: int, nbytes: int) -> None:
        self.messages[layer, src, dst] += 1
        self.bytes[layer, src, dst] += nbytes

    def merge(self, other: "Counters") -> "Counters":
        """Add `other`'s counts into this one (peak memory: the larger); returns self."""
        if (other.num_servers, other.num_layers) != (self.num_servers, self.num_layers):
            raise MoecompressError("cannot merge counters of different deployments")
        self.calls += other.calls
        self.tokens += other.tokens
        for name in ("messages", "bytes", "hops", "pairs", "exchange_seconds", "compute_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.peak_memory_bytes = np.maximum(self.peak_memory_bytes, other.peak_memory_bytes)
        for name in TOKEN_FIELDS:
            self.token[name] = self.token[name] + other.token[name]
        for precision, nbytes in other.bytes_by_precision.items():
            self.bytes_by_precision[precision] = self.bytes_by_precision.get(precision, 0) + nbytes
        return self

    def counts(self) -> dict:
        """The exact counts (no times, no memory): what a replay must reproduce (with token policies in use, their
        counts too)."""
        out = {"calls": self.calls, "tokens": self.tokens, "messages": self.messages.tolist(),
               "bytes": self.bytes.tolist(), "hops": self.hops.tolist(), "pairs": self.pairs.tolist()}
        if self.token_policy != "none":
            out["token_policies"] = self.token_counts()
        return out

    def token_counts(self) -> dict:
        """Token-policy counts: the spec, per-layer arrays, totals, bytes by payload precision."""
        totals = {name: int(v.sum()) for name, v in self.token.items()}
        return {"spec": self.token_policy, **{name: v.tolist() for name, v in self.token.items()},
                "total": totals, "bytes_by_precision": dict(sorted(self.bytes_by_precision.items())),
                "round_trips_saved": {"calls": totals["saved_hops"] // 2, "token_layers":
                                      totals["lossless_remote_tokens"] - totals["remote_tokens"]}}

    def to_json(self) -> dict:
        total_bytes = int(self.bytes.sum())
        return {
            "num_servers": self.num_servers,
            "num_layers": self.num_layers,
            **self.counts(),
            "total": {
                "messages": int(self.messages.sum()),
                "bytes": total_bytes,
                "hops": int(self.hops.sum()),
                "bytes_per_token": total_bytes / self.tokens if self.tokens else 0.0,
                "hops_per_call": float(self.hops.sum()) / self.calls if self.calls else 0.0,
                "bytes_per_link": self.bytes.sum(0).tolist(),
                "pairs_per_server": self.pairs.sum(0).tolist(),
            },
            "exchange_seconds": self.exchange_seconds.tolist(),
            "compute_seconds": self.compute_seconds.tolist(),
            "peak_memory_bytes": self.peak_memory_bytes.tolist(),
            "token_policies": self.token_counts(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Counters":
        c = cls(int(d["num_servers"]), int(d["num_layers"]))
        c.calls, c.tokens = int(d["calls"]), int(d["tokens"])
        for name in ("messages", "bytes", "hops", "pairs", "peak_memory_bytes"):
            setattr(c, name, np.asarray(d[name], np.int64).reshape(getattr(c, name).shape))
        for name in ("exchange_seconds", "compute_seconds"):
            setattr(c, name, np.asarray(d[name], np.float64))
        tok = d.get("token_policies")
        if tok:
            c.token_policy = tok["spec"]
            c.token = {name: np.asarray(tok.get(name, c.token[name]), np.int64) for name in TOKEN_FIELDS}
            c.bytes_by_precision = {k: int(v) for k, v in tok["bytes_by_precision"].items()}
        return c

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    def table(self) -> str:
        """Per layer, then per server, then totals: a plain-text table."""
        N = self.num_servers
        lines = [f"{self.calls} forward calls, {self.tokens} token rows, {N} servers",
                 f"{'layer':>5} {'messages':>9} {'bytes':>12} {'hops':>6}  pairs per server"]
        for layer in range(self.num_layers):
            pairs = " ".join(f"{int(p):>7}" for p in self.pairs[layer])
            lines.append(f"{layer:>5} {int(self.messages[layer].sum()):>9} {int(self.bytes[layer].sum()):>12} "
                         f"{int(self.hops[layer]):>6}  {pairs}")
        lines.append(f"{'all':>5} {int(self.messages.sum()):>9} {int(self.bytes.sum()):>12} {int(self.hops.sum()):>6}  "
                     + " ".join(f"{int(p):>7}" for p in self.pairs.sum(0)))
        if self.tokens:
            lines.append(f"bytes per token row {self.bytes.sum() / self.tokens:.1f}; one-way hops per call "
                         f"{self.hops.sum() / max(self.calls, 1):.2f}")
        if self.token_policy != "none":
            t = self.token_counts()
            tot = t["total"]
            lines.append(f"token policies {self.token_policy}: pairs pruned {tot['pruned_pairs']}, substituted "
                         f"{tot['substituted_pairs']}; rows fused {tot['fused_rows']} of {tot['token_rows']}; round "
                         f"trips saved {t['round_trips_saved']['calls']} (calls), "
                         f"{t['round_trips_saved']['token_layers']} of {tot['lossless_remote_tokens']} (token x layer)")
            lines.append("bytes by payload precision: " + ", ".join(f"{k} {v}" for k, v in
                                                                     t["bytes_by_precision"].items()))
        lines.append(f"{'server':>6} {'sent B':>12} {'received B':>12} {'compute s':>10} {'exchange s':>10} "
                     f"{'peak MiB':>9}")
        link = self.bytes.sum(0)
        for n in range(N):
            lines.append(f"{n:>6} {int(link[n].sum()):>12} {int(link[:, n].sum()):>12} "
                         f"{self.compute_seconds[n]:>10.3f} "
                         f"{self.exchange_seconds[n]:>10.3f} {self.peak_memory_bytes[n] / 2**20:>9.1f}")
        return "\n".join(lines)
