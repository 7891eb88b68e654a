"""The time model: modeled seconds of a run from its Counters and a link profile (pure functions).

modeled time = compute on the critical path + sequential one-way hops x link latency + critical bytes / bandwidth.

Assumptions, stated once: every server has one full-duplex link of the profile's rate to a switch and one-way
latency per message. In the expert model all bytes go through the home's link (requests out, then replies in,
two sequential phases per MoE layer), so every byte is on the critical path; in the pipeline model the hops are
sequential, so again every byte is. Compute on the critical path (`critical_compute`): the pipeline runs its stages
one after the other; in the expert model the home computes its own pairs of a MoE layer while the other servers
compute theirs (as the runtime's dispatcher does), so each MoE layer costs its busiest rank, plus the dispatch
the profile measured on the runtime's dispatcher (the home's routing and per-request encode/decode/index_add in
sequence; each server's per-request decode/encode on its side of the layer) and, per request, a round trip
through the runtime's torch.distributed exchange measured between two local processes (both ends' gloo calls and
wake-ups; the pipeline pays it per two hops). A decode step also pays generation's own work besides the forward.
The pipeline's stage encoding (hidden state, mask, positions) is not modeled apart from that round trip.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters

_RATE = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
         "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class LinkProfile:
    name: str
    bytes_per_second: float
    latency_seconds: float  # one way, per message

    def __post_init__(self):
        if not self.bytes_per_second > 0 or not self.latency_seconds >= 0:
            raise MoecompressError(f"link {self.name!r}: rate must be > 0 and latency >= 0")

    def describe(self) -> str:
        return f"{self.name}: {self.bytes_per_second * 8 / 1e6:g} Mbit/s, {self.latency_seconds * 1e3:g} ms one way"


PROFILES = {
    "lan": LinkProfile("lan", 1e9 / 8, 0.5e-3),
    "wan": LinkProfile("wan", 100e6 / 8, 5e-3),
}


def parse_profile(text: str) -> LinkProfile:
    """'lan', 'wan', or 'NAME=RATE,LATENCY' with RATE like 1Gbit/s, 100Mbit, 50MB/s and LATENCY like 2ms."""
    text = text.strip()
    if text in PROFILES:
        return PROFILES[text]
    m = re.fullmatch(r"([A-Za-z0-9_-]+)=\s*([\d.]+)\s*([A-Za-z]+)(?:/s)?\s*,\s*([\d.]+)\s*(s|ms|us)", text)
    unit = m.group(3).lower() if m else None
    if not m or unit not in _RATE:
        raise MoecompressError(
            f"cannot read a link profile from {text!r}; use one of {', '.join(PROFILES)} or NAME=RATE,LATENCY, "
            "e.g. edge=100Mbit/s,5ms (rate units bit kbit Mbit Gbit B KB MB GB per second; latency s ms us)"
        )
    return LinkProfile(m.group(1), float(m.group(2)) * _RATE[unit], float(m.group(4)) * _TIME[m.group(5)])


ROBUST_LINKS = ("lan", "wan")  # what `moecompress shard` plans for when no --link is given


def parse_profiles(text: str | None) -> tuple[LinkProfile, ...]:
    """Several link profiles joined by '+' ('lan+wan', 'lan+edge=200Mbit/s,2ms'); None: ROBUST_LINKS."""
    parts = ROBUST_LINKS if text is None else [t for t in text.split("+") if t.strip()]
    if not parts:
        raise MoecompressError("no link profile given; use lan, wan, NAME=RATE,LATENCY, or several joined by '+'")
    links = tuple(parse_profile(t) for t in parts)
    if len({link.name for link in links}) != len(links):
        raise MoecompressError(f"link profiles need distinct names: {text!r}")
    return links


def critical_compute(layer_rank_seconds, home_seconds: float, mode: str) -> float:
    """Compute seconds on the critical path of one call.

    layer_rank_seconds [layers, N]: what each rank computes of each layer (pipeline: a stage computes its whole
    layers; expert model: each rank its pairs of the MoE layer); home_seconds: what only the home computes besides
    (expert model: embeddings, attention, routers, head; pipeline: embeddings and head). Pipeline stages run one
    after the other (sum); in the expert model the home computes its own pairs while the other servers compute
    theirs (per layer: the busiest rank).
    """
    rows = [[float(x) for x in row] for row in layer_rank_seconds]
    if mode == "pipeline":
        return home_seconds + sum(sum(row) for row in rows)
    return home_seconds + sum(max(row, default=0.0) for row in rows)


@dataclass(frozen=True)
class ModeledTime:
    seconds: float  # total modeled seconds of all the calls
    compute: float
    latency: float
    transfer: float

    def per(self, count: float) -> float:
        return self.seconds / count if count else 0.0


def modeled_time(counters: Counters, profile: LinkProfile, compute_seconds: float) -> ModeledTime:
    """Modeled seconds of the calls counted in `counters`, given their compute on the critical path."""
    latency = float(counters.hops.sum()) * profile.latency_seconds
    transfer = float(counters.bytes.sum()) / profile.bytes_per_second
    return ModeledTime(compute_seconds + latency + transfer, compute_seconds, latency, transfer)


@dataclass(frozen=True)
class ComputeProfile:
    """Measured compute seconds of one decode call (`batch` sequences, one new token each, `context` keys cached)
    of a checkpoint on one kind of server: what the time model charges for compute.

    layer_seconds [D]: each whole decoder layer (attention, norms, router and its MoE block); moe_seconds [L]: the
    experts block of each MoE layer alone (part of its decoder layer's time); head_seconds: the rest of a call
    (embeddings, final norm, lm_head). Measure it on the target servers (`moecompress profile`) to plan for them.

    The expert model's dispatch, per MoE layer of the same call (empty: not measured, charged as 0), measured on
    the runtime's own dispatcher (runtime/edge/dispatcher.py) in one process: dispatch_seconds [L] what the home
    spends routing a layer besides computing experts (route_pairs, sent_rows, masks, counters); message_seconds [L]
    the home's share of one request to another server carrying the call's rows (gather, encode, decode the reply,
    index_add); serve_seconds [L] that server's share besides computing its experts (decode the request, encode the
    reply); transport_seconds: one request + reply through the runtime's torch.distributed exchange between two
    local processes (shard/profile_transport.py: both ends' gloo calls and wake-ups, loopback latency included).
    generate_seconds: what a generation step adds to the forward (choosing the token, cache and stopping checks).
    """

    batch: int
    context: int
    layer_seconds: tuple[float, ...]
    moe_seconds: tuple[float, ...]
    moe_decoder_layers: tuple[int, ...]  # [L] the decoder layer of each MoE layer
    head_seconds: float
    source: str = ""  # where and how it was measured
    dispatch_seconds: tuple[float, ...] = ()  # [L] or (): the home's routing of a layer (expert model)
    message_seconds: tuple[float, ...] = ()  # [L] or (): the home's share of one request + its reply
    serve_seconds: tuple[float, ...] = ()  # [L] or (): the server's share of one request besides its experts
    dtype: str = ""  # the compute dtype measured ("float32", "bfloat16", ...); "": not recorded
    transport_seconds: float = 0.0  # wall s of one request + reply through torch.distributed on loopback (expert)
    generate_seconds: float = 0.0  # a generation step's own work besides the model's forward (sampling, cache, ...)

    def __post_init__(self):
        L = len(self.moe_decoder_layers)
        if len(self.moe_seconds) != L:
            raise MoecompressError("compute profile: one moe_seconds entry per MoE layer")
        for name in ("dispatch_seconds", "message_seconds", "serve_seconds"):
            if len(getattr(self, name)) not in (0, L):
                raise MoecompressError(f"compute profile: {name} needs one entry per MoE layer ({L}) or none")
        if any(t < 0 for t in (*self.layer_seconds, *self.moe_seconds, self.head_seconds, *self.dispatch_seconds,
                               *self.message_seconds, *self.serve_seconds, self.transport_seconds,
                               self.generate_seconds)):
            raise MoecompressError("compute profile: seconds must be >= 0")

    def to_json(self) -> dict:
        return {"batch": self.batch, "context": self.context, "layer_seconds": list(self.layer_seconds),
                "moe_seconds": list(self.moe_seconds), "moe_decoder_layers": list(self.moe_decoder_layers),
                "head_seconds": self.head_seconds, "source": self.source,
                "dispatch_seconds": list(self.dispatch_seconds), "message_seconds": list(self.message_seconds),
                "serve_seconds": list(self.serve_seconds), "dtype": self.dtype,
                "transport_seconds": self.transport_seconds, "generate_seconds": self.generate_seconds}

    @classmethod
    def from_json(cls, d: dict) -> "ComputeProfile":
        try:
            return cls(int(d["batch"]), int(d["context"]), tuple(map(float, d["layer_seconds"])),
                       tuple(map(float, d["moe_seconds"])), tuple(map(int, d["moe_decoder_layers"])),
                       float(d["head_seconds"]), str(d.get("source", "")),
                       tuple(map(float, d.get("dispatch_seconds", ()))),
                       tuple(map(float, d.get("message_seconds", ()))),
                       tuple(map(float, d.get("serve_seconds", ()))), str(d.get("dtype", "")),
                       float(d.get("transport_seconds", 0.0)), float(d.get("generate_seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MoecompressError(f"not a compute profile ({exc}); write one with `moecompress profile`") from exc


def profile_compute(placement, counters: Counters, profile: ComputeProfile) -> float:
    """Compute seconds on the critical path of one call of the profile's shape on `placement` (critical_compute).

    Pipeline: each stage computes its decoder layers, the home also the head, and every two hops (a round trip)
    cost the profile's transport round trip. Both: a generation step's own work (`generate_seconds`). Expert model:
    the home computes the head and every decoder layer but its experts; each server computes the share of a MoE
    layer's experts time that its routed pairs (from `counters`) are of the layer's pairs. The dispatch (when the
    profile has it): the home routes every layer and handles each request it sends, transport round trip included
    (before or after the overlapped part: added to the home's own time); each server decodes and encodes each
    request it gets (added to its share of the layer). Requests per call come from `counters` (messages from the
    home, divided by its calls).
    """
    import numpy as np

    N = placement.num_servers
    if len(profile.moe_seconds) != placement.num_layers and placement.mode == "expert":
        raise MoecompressError(f"compute profile has {len(profile.moe_seconds)} MoE layers, the placement "
                               f"{placement.num_layers}: it was measured on another model")
    if placement.mode == "pipeline":
        if len(profile.layer_seconds) != len(placement.layer_servers):
            raise MoecompressError(f"compute profile has {len(profile.layer_seconds)} decoder layers, the placement "
                                   f"{len(placement.layer_servers)}: it was measured on another model")
        rows = [[t if s == server else 0.0 for s in range(N)]
                for t, server in zip(profile.layer_seconds, placement.layer_servers)]
        handovers = float(counters.hops.sum()) / max(counters.calls, 1) / 2 * profile.transport_seconds
        return critical_compute(rows, profile.head_seconds + profile.generate_seconds + handovers, "pipeline")
    pairs = counters.pairs.astype(np.float64)  # [L, N]
    share = pairs / np.maximum(pairs.sum(1, keepdims=True), 1)
    rows = [[t * share[layer, s] for s in range(N)] for layer, t in enumerate(profile.moe_seconds)]
    home = profile.head_seconds + profile.generate_seconds + sum(profile.layer_seconds) - sum(profile.moe_seconds)
    return critical_compute(rows, home + add_dispatch(rows, placement.home, counters, profile), "expert")


def add_dispatch(rows: list[list[float]], home: int, counters: Counters, profile: ComputeProfile) -> float:
    """Add each server's per-request work to `rows` [L][N] in place; return the home's dispatch seconds per call
    (its routing, and per request its own work and the measured transport round trip, requests taken in turn)."""
    L = len(rows)
    dispatch = profile.dispatch_seconds or (0.0,) * L
    message = profile.message_seconds or (0.0,) * L
    serve = profile.serve_seconds or (0.0,) * L
    calls = max(counters.calls, 1)
    extra = 0.0
    for layer in range(L):
        requests = counters.messages[layer, home] / calls  # [N] requests per call to each server
        extra += dispatch[layer] + float(requests.sum()) * (message[layer] + profile.transport_seconds)
        for s, r in enumerate(requests):
            if s != home:
                rows[layer][s] += float(r) * serve[layer]
    return extra
