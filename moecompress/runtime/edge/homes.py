"""Several homes (expert model): requests admitted at different servers, each holding the dense weights.

A deployment whose dense weights are replicated (`moecompress shard` without --dense-on-one) can admit requests at
every server that holds them. `deploy(OUT, homes=(0, 1))` spreads the sequences of each batch over the homes round
robin (sequence i at homes[i % len(homes)]): each home runs attention and keeps the KV cache of its own sequences,
routes their tokens from itself (routing.route_pairs with each token's home: a copy on the token's home first) and
adds the servers' replies. A home is an expert server for the other homes at the same time: its own experts answer
their requests. Counters count every message with the home that sent it, so a replay with each call's home
(replay.Call.home) reproduces them.

The first home is the front: the process the user talks to. Simulation: every home's model in this process, all
servers' handlers on the same bytes (InProcess). Real run: every other home is a process that loads its own bundle's
model and serves (serve.serve with `admit`): the front sends it its share of a call (OP_ADMIT: ids, mask, what to
run), serves that home's requests for the front's experts until the result comes back (OP_RESULT: the output, the
counts of the exchange, the calls). The homes take turns (one home computes at a time, the front orders them): the
exchange and the counts are those of concurrent homes, the throughput is not.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.handlers import PlanServer
from moecompress.runtime.edge.running import Deployment
from moecompress.runtime.edge.transport import recv_request, send_request


def split_rows(batch: int, homes: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{home: row indices} of a batch: row i at homes[i % len(homes)] (homes without a row are left out)."""
    rows = torch.arange(batch)
    out = {h: rows[i::len(homes)] for i, h in enumerate(homes)}
    return {h: r for h, r in out.items() if r.numel()}


def local_experts(model: nn.Module) -> dict:
    """{MoE layer: the home's own PackedExperts} of a home model (its dispatchers' local modules)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    return {m.layer: m.local for m in model.modules() if isinstance(m, DispatchedExperts) and m.local is not None}


def home_server(server: int, model: nn.Module, num_experts: int):
    """The expert server of a home (answers the other homes with the home model's own experts)."""
    from moecompress.runtime.edge.rank_model import ExpertServer

    return PlanServer(ExpertServer(server, server, local_experts(model)), num_experts)


class RemoteHome:
    """The front's handle on another home's process: admits that home's rows of a call there and, meanwhile,
    answers the requests it sends for the front's experts."""

    def __init__(self, home: int, transport, server, counters: Counters):
        self.home, self.transport, self.server, self.counters = home, transport, server, counters
        self.calls: list[tuple[int, int, int]] = []

    def forward(self, input_ids, attention_mask):
        return self._admit({"kind": "forward", "ids": input_ids, "mask": attention_mask, "kwargs": {}})

    def generate(self, input_ids, attention_mask, **kwargs):
        return self._admit({"kind": "generate", "ids": input_ids, "mask": attention_mask, "kwargs": kwargs})

    def _admit(self, request: dict):
        import torch.distributed as dist

        t, h = self.transport, self.home
        head, payload = wire.encode_object(wire.OP_ADMIT, request)
        with t.lock:  # no ping goes to the home while it works: its channel from the front carries replies only
            try:
                send_request(h, head, payload, t.device)
                while True:
                    _, got, buf = recv_request(h, t.device)
                    if got[0] == wire.OP_RESULT:
                        result = wire.decode_object(buf)
                        break
                    if got[0] in (wire.OP_EXPERT, wire.OP_PLAN):
                        for _, _, reply in self.server.handle(got, buf):
                            dist.send(reply.to(t.device), h)
            except RuntimeError as exc:
                raise t._failure(h, exc) from exc
            t._last = time.monotonic()
        if "error" in result:
            raise MoecompressError(f"home {h}: {result['error']}")
        self.counters.merge(Counters.from_json(result["counters"]))
        self.calls.extend(tuple(c) for c in result["calls"])
        return result["out"]


def run_admission(deployment, request: dict) -> dict:
    """At a home other than the front: run an admitted request on this home's deployment; the result with the
    counts of its exchange (the deployment's counters start afresh) and its calls."""
    n0 = len(deployment.calls)
    try:
        if request["kind"] == "forward":
            out = deployment.forward(request["ids"], request["mask"])
        else:
            out = deployment.generate(request["ids"], request["mask"], **request["kwargs"])
    except MoecompressError as exc:
        return {"error": str(exc)}
    counts = deployment.reset_counters()
    return {"out": out, "counters": counts.to_json(), "calls": [list(c) for c in deployment.calls[n0:]]}


class HomesDeployment:
    """A deployment admitting requests at several homes; the same API as Deployment (forward, generate,
    generate_text, counters, close). members: {home: Deployment (this process) or RemoteHome}; front: the
    Deployment of the first home."""

    def __init__(self, homes: tuple[int, ...], members: dict, front, counters: Counters, sim_members=()):
        self.homes, self.members, self.front, self._counters = tuple(homes), members, front, counters
        self.info, self.tokenizer = front.info, front.tokenizer
        self.model = front.model
        self._sim = list(sim_members)  # simulation: the other homes' Deployments (closed with the front)
        self.calls: list[tuple[int, int, int, int]] = []  # (home, sequences, new tokens, keys) of every call

    @property
    def home(self) -> int:
        return self.homes[0]

    def _run(self, input_ids, attention_mask, fn):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outs = {}
        for h, rows in split_rows(input_ids.shape[0], self.homes).items():
            member = self.members[h]
            n0 = len(member.calls)
            try:
                outs[h] = (rows, fn(member, input_ids[rows], attention_mask[rows]))
            except MoecompressError:  # a home or server failed: stop the others, free the process group
                if member is not self.front and not self.front._closed:
                    self.front._abort()
                raise
            self.calls.extend((h, *c) for c in member.calls[n0:])
        return outs

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        outs = self._run(input_ids, attention_mask, lambda m, i, a: m.forward(i, a))
        first = next(iter(outs.values()))[1]
        logits = torch.empty(input_ids.shape[0], *first.shape[1:], dtype=first.dtype)
        for rows, out in outs.values():
            logits[rows] = out
        return logits

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Each home generates for its rows; rows that stopped early are right-padded with the pad token."""
        outs = self._run(input_ids, attention_mask, lambda m, i, a: m.generate(i, a, **kwargs))
        length = max(out.shape[1] for _, out in outs.values())
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else (
            config.eos_token_id if isinstance(config.eos_token_id, int) else 0)
        ids = torch.full((input_ids.shape[0], length), pad, dtype=input_ids.dtype)
        for rows, out in outs.values():
            ids[rows, :out.shape[1]] = out
        return ids

    def generate_text(self, prompts: list[str], **kwargs) -> list[str]:
        return Deployment.generate_text(self, prompts, **kwargs)

    @property
    def counters(self) -> Counters:
        return self.front.counters

    def trace(self):
        """Simulation with record=True: [(home, experts [T, L, k], weights, calls)] of every home."""
        return [(h, *m.trace()) for h, m in self.members.items() if hasattr(m, "trace")]

    def close(self) -> None:
        for d in self._sim:
            if not d._closed:
                d._closed = True
                d._hook.remove()
        if not self.front._closed:
            self.front.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
