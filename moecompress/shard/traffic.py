"""Cross-server traffic of a placement: measured by replaying a routing trace, or estimated from counts.

The token model is the one of problem.py. A token enters at the server holding the largest share of its
layer-0 routing weight (or at a fixed `ingress` server); at each layer it uses, of an expert's copies, one on
a server it must visit anyway (its current server first), else one on its current server, else the expert's
primary (primaries decide the ingress); its experts' servers S cost |S - {c}| dispatch
and |S - {g}| gather messages of `hidden_size * payload_bytes` bytes each, g being the server of S with the
largest routing weight (ties: stay, then the lowest id), where the token then sits. With the dense weights
on one server h, tokens always sit on h: 2 |S - {h}| messages. Device-to-device traffic inside a server is
not counted. Load is the routed (token, expert) pairs each server computes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.shard.routing import RoutingStats, RoutingTrace

_CHUNK = 65536  # tokens replayed at once


@dataclass(frozen=True)
class TrafficReport:
    num_tokens: int
    hidden_size: int
    payload_bytes: int
    bytes_per_token: float  # mean over tokens, all MoE layers
    bytes_per_layer: tuple[float, ...]  # per token, each MoE layer
    messages_per_token: float
    local_fraction: float  # share of (token, layer) whose experts all sat on the token's current server
    server_load: tuple[int, ...]  # routed (token, expert) pairs computed by each server, all layers
    balance: float  # max / mean of server_load
    layer_balance: float  # worst layer's max / mean routed pairs per server
    seconds_per_token: float | None = None  # bytes_per_token / link bandwidth, when given

    def to_json(self) -> dict:
        d = asdict(self)
        d["bytes_per_layer"] = list(self.bytes_per_layer)
        d["server_load"] = list(self.server_load)
        return d


def expected_traffic(
    placement: Placement,
    trace: RoutingTrace,
    hidden_size: int,
    payload_bytes: int = 2,
    link_bandwidth: float | None = None,
    ingress: int | None = None,
) -> TrafficReport:
    """Replay `trace` token by token (vectorised over tokens) on `placement`, honouring replicas."""
    L, E, N = placement.num_layers, placement.num_experts, placement.num_servers
    if (trace.num_layers, trace.num_experts) != (L, E):
        raise MoecompressError(
            f"trace has {trace.num_layers} layers x {trace.num_experts} experts, placement {L} x {E}"
        )
    if ingress is not None and not 0 <= ingress < N:
        raise MoecompressError(f"ingress server must be in 0..{N - 1}, got {ingress}")
    holds = np.zeros((L, E, N), bool)
    for layer, experts in enumerate(placement.assignment):
        for expert, servers in enumerate(experts):
            holds[layer, expert, list(servers)] = True
    primary = np.array(placement.primaries())  # [L, E]
    home = placement.dense_servers[0] if len(placement.dense_servers) == 1 else None
    messages, local, load = np.zeros(L), np.zeros(L), np.zeros((L, N))
    for start in range(0, trace.num_tokens, _CHUNK):
        experts = trace.experts[start : start + _CHUNK]  # [t, L, k]
        weights = trace.weights[start : start + _CHUNK]
        rows = np.arange(len(experts))
        if home is not None or ingress is not None:
            c = np.full(len(experts), home if home is not None else ingress)
        else:
            c = _gather(primary[0][experts[:, 0]], weights[:, 0], None, N)
        for layer in range(L):
            s = _route(holds[layer][experts[:, layer]], primary[layer][experts[:, layer]], c)  # [t, k]
            hit = np.bincount((rows[:, None] * N + s).ravel(), minlength=len(rows) * N).reshape(-1, N) > 0
            spread, stays = hit.sum(1), hit[rows, c]
            if home is not None:
                messages[layer] += 2 * (spread - stays).sum()
            else:
                messages[layer] += ((spread - stays) + (spread - 1)).sum()
                c = _gather(s, weights[:, layer], c, N)
            local[layer] += (spread == stays).sum()
            load[layer] += np.bincount(s.ravel(), minlength=N)
    T = max(trace.num_tokens, 1)
    per_layer = messages / T * hidden_size * payload_bytes
    total = load.sum(0)
    return TrafficReport(
        num_tokens=trace.num_tokens,
        hidden_size=hidden_size,
        payload_bytes=payload_bytes,
        bytes_per_token=float(per_layer.sum()),
        bytes_per_layer=tuple(float(b) for b in per_layer),
        messages_per_token=float(messages.sum() / T),
        local_fraction=float(local.sum() / (T * L)),
        server_load=tuple(int(v) for v in total),
        balance=_max_over_mean(total),
        layer_balance=max((_max_over_mean(row) for row in load), default=1.0),
        seconds_per_token=float(per_layer.sum() / link_bandwidth) if link_bandwidth else None,
    )


def estimate_traffic(placement: Placement, stats: RoutingStats, hidden_size: int, payload_bytes: int = 2) -> float:
    """Expected cross-server bytes per token from routing counts alone (primaries only, no replay).

    With n_s the number of a token's layer-l experts on server s, P(n_s >= 1) >= E[n_s]^2 / E[n_s^2]
    (Cauchy-Schwarz; exact when n_s takes one non-zero value), both moments known from tokens and coact.
    P(the token stays), i.e. its gather server at layer l-1 holds one of its layer-l experts: the path pairs
    inside each server over k (the gather server taken as the server of a random layer-(l-1) expert),
    discounted like n_s by P(n_s >= 1) / E[n_s]. A guide for the optimiser, not a measurement.
    """
    L, N, T, k = stats.num_layers, placement.num_servers, stats.num_tokens, stats.top_k
    primary = np.array(placement.primaries())  # [L, E]
    home = placement.dense_servers[0] if len(placement.dense_servers) == 1 else None
    messages = 0.0
    for layer in range(L):
        onehot = np.eye(N)[primary[layer]]  # [E, N]
        mean = stats.tokens[layer] @ onehot / T  # [N] E[n_s]
        square = mean + ((stats.coact[layer] / T) @ onehot * onehot).sum(0)  # [N] E[n_s^2]
        used = np.divide(mean**2, square, out=np.zeros(N), where=square > 0)  # [N] P(n_s >= 1)
        if home is not None:
            messages += 2 * (used.sum() - used[home])
            continue
        stay = 1.0
        if layer > 0:
            before = np.eye(N)[primary[layer - 1]]
            together = np.diag(before.T @ stats.paths[layer - 1] @ onehot) / (k * T)  # [N] E[x_s n_s] / k
            stay = min(1.0, float((together * np.divide(used, mean, out=np.zeros(N), where=mean > 0)).sum()))
        messages += 2 * used.sum() - 1 - stay
    return float(messages * hidden_size * payload_bytes)


def _route(has: np.ndarray, primary: np.ndarray, current: np.ndarray) -> np.ndarray:
    """[t, k] server computing each of a token's experts, given which servers hold copies (has [t, k, N]).

    A copy on a server the token visits anyway (one holding an expert with no other copy; its current server
    first), else a copy on its current server, else the primary. Plain "local copy first" could add a server
    to the token's set and cost more messages than it saves.
    """
    t, k, N = has.shape
    rows = np.arange(t)
    single = has.sum(-1, dtype=np.int8) == 1  # [t, k]
    if single.all():
        return primary
    forced = np.bincount((rows[:, None] * N + primary)[single], minlength=t * N).reshape(t, N) > 0  # must visit
    visited = has & forced[:, None, :]  # [t, k, N] copies on servers visited anyway
    anywhere = visited.sum(-1, dtype=np.int8) > 0
    use_local = has[rows, :, current] & (forced[rows, current][:, None] | ~anywhere)
    chosen = np.where(anywhere, np.argmax(visited, axis=-1), primary)
    return np.where(use_local, current[:, None], chosen)


def _gather(servers: np.ndarray, weights: np.ndarray, current: np.ndarray | None, num_servers: int) -> np.ndarray:
    """[t] server with the largest summed routing weight of the token's experts (ties: current, lowest id)."""
    rows = np.arange(len(servers))
    flat = (rows[:, None] * num_servers + servers).ravel()
    score = np.bincount(flat, weights=weights.astype(np.float64).ravel() + 1e-9, minlength=len(rows) * num_servers)
    score = score.reshape(-1, num_servers)
    if current is not None:
        score[rows, current] += 1e-12
    return np.argmax(score, axis=1)


def _max_over_mean(load: np.ndarray) -> float:
    mean = float(np.mean(load))
    return float(np.max(load)) / mean if mean > 0 else 1.0
