"""Several homes (expert model): requests admitted at different servers, each holding the dense weights.

A deployment whose dense weights are replicated (`moecompress shard` without --dense-on-one) can admit requests at
every server that holds them. `deploy(OUT, homes=(0, 1))` spreads the sequences of each batch over the homes round
robin (sequence i at homes[i % len(homes)]): each home runs attention and keeps the KV cache of its own sequences,
routes their tokens from itself (routing.route_pairs with each token's home: a copy on the token's home first) and
adds the servers' replies. A home is an expert server for the other homes at the same time: its own experts answer
their requests. Counters count every message with the home that sent it, per home (`home_counters`) and in total,
so a replay with each call's home (replay.Call.home) reproduces them.

The first home is the front: the process the user talks to. Simulation: every home's model in this process, all
servers' handlers on the same bytes (InProcess), one home after the other (the counts do not depend on the order).
Real run: every other home is a process that loads its own bundle's model and serves; the front sends each its share
of a call (OP_ADMIT: ids, mask, what to run, the token policies), runs its own share meanwhile, then takes each
home's result (OP_RESULT: the output, the counts of its exchange, its calls). The homes compute at the same time;
how each process answers requests while computing its own rows is in home_rank.py. Token policies run at every
home (each plans its own rows; user policies must be registered in every home's process).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.handlers import PlanServer
from moecompress.runtime.edge.running import Deployment
from moecompress.runtime.edge.transport import LONG_WAIT, RESULT_TAG, recv_request, send_request


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
    """The expert server of a home (answers the other homes with the home model's own experts). Its computations
    and the home's own (its dispatchers') share one lock: in a real run they come from two threads (home_rank.py)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts
    from moecompress.runtime.edge.rank_model import ExpertServer

    lock = threading.Lock()
    for m in model.modules():
        if isinstance(m, DispatchedExperts):
            m.lock = lock
    return PlanServer(ExpertServer(server, server, local_experts(model), lock), num_experts)


class RemoteHome:
    """The front's handle on another home's process: `start` admits that home's rows of a call there (the home
    computes them while the front computes its own), `finish` takes the result. counters: that home's counts."""

    def __init__(self, home: int, transport, counters: Counters):
        self.home, self.transport, self.counters = home, transport, counters
        self.calls: list[tuple[int, int, int]] = []
        self.tokens: tuple | None = None  # (spec, similarity) to send with the next admission
        self._buffer = None

    def start(self, kind: str, input_ids, attention_mask, kwargs: dict) -> None:
        t, h = self.transport, self.home
        request = {"kind": kind, "ids": input_ids, "mask": attention_mask, "kwargs": kwargs}
        if self.tokens is not None:
            request["tokens"], request["similarity"] = self.tokens
        head, payload = wire.encode_object(wire.OP_ADMIT, request)
        with t.lock:
            try:
                send_request(h, head, payload, t.device)
            except RuntimeError as exc:
                raise t._failure(h, exc) from exc
        self.tokens = None

    def finish(self):
        t, h = self.transport, self.home
        try:  # as long as that home takes: a lost home closes its connection (named below)
            _, _, buf = recv_request(h, t.device, tag=RESULT_TAG, wait=LONG_WAIT)
        except RuntimeError as exc:
            raise t._failure(h, exc) from exc
        result = wire.decode_object(buf)
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
        if "tokens" in request:
            deployment.set_tokens(request["tokens"], request.get("similarity"))
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
    generate_text, counters, set_tokens, close). members: {home: Deployment (this process) or RemoteHome}; front: the
    Deployment of the first home; service: the front's ExpertService (real run)."""

    def __init__(self, homes: tuple[int, ...], members: dict, front, sim_members=(), service=None):
        self.homes, self.members, self.front = tuple(homes), members, front
        self.info, self.tokenizer = front.info, front.tokenizer
        self.model = front.model
        self._sim = list(sim_members)  # simulation: the other homes' Deployments (closed with the front)
        self._service = service
        self.calls: list[tuple[int, int, int, int]] = []  # (home, sequences, new tokens, keys) of every call

    @property
    def home(self) -> int:
        return self.homes[0]

    def _run(self, input_ids, attention_mask, kind: str, kwargs: dict):
        """Every home's rows: the other homes' processes start theirs first, the front computes its own meanwhile
        (simulation: one home after the other)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        split = split_rows(input_ids.shape[0], self.homes)
        n0 = {h: len(self.members[h].calls) for h in split}
        outs, started = {}, []
        try:
            for h, rows in split.items():
                if isinstance(self.members[h], RemoteHome):
                    self.members[h].start(kind, input_ids[rows], attention_mask[rows], kwargs)
                    started.append(h)
            for h, rows in split.items():
                member = self.members[h]
                if not isinstance(member, RemoteHome):
                    fn = member.forward if kind == "forward" else member.generate
                    outs[h] = (rows, fn(input_ids[rows], attention_mask[rows], **kwargs))
            for h in started:
                outs[h] = (split[h], self.members[h].finish())
        except MoecompressError:  # a home or server failed: stop the others, free the process group
            if started and not self.front._closed:
                self.front._abort()
            raise
        for h in split:
            self.calls.extend((h, *c) for c in self.members[h].calls[n0[h]:])
        return outs

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        outs = self._run(input_ids, attention_mask, "forward", {})
        first = next(iter(outs.values()))[1]
        logits = torch.empty(input_ids.shape[0], *first.shape[1:], dtype=first.dtype)
        for rows, out in outs.values():
            logits[rows] = out
        return logits

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Each home generates for its rows; rows that stopped early are right-padded with the pad token."""
        outs = self._run(input_ids, attention_mask, "generate", kwargs)
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

    def home_counters(self) -> dict[int, Counters]:
        """{home: the counts of the requests that home sent} (front: with the servers' times and memory)."""
        return {h: (m.counters if m is self.front else m.counters if isinstance(m, RemoteHome) else m._counters)
                for h, m in self.members.items()}

    @property
    def counters(self) -> Counters:
        """Every home's counts added up."""
        per_home = self.home_counters()
        first = per_home[self.home]
        total = Counters(first.num_servers, first.num_layers)
        total.token_policy = first.token_policy
        for c in per_home.values():
            total.merge(c)
        return total

    def set_tokens(self, tokens=None, similarity=None) -> None:
        """Switch the token policies at every home (the other homes' processes with their next admission)."""
        from moecompress.runtime.edge.tokens import load_similarity, resolve_pipeline

        pipeline = resolve_pipeline(tokens)
        sim = load_similarity(similarity)
        for m in self.members.values():
            if isinstance(m, RemoteHome):
                m.tokens = (pipeline.spec, sim)
                m.counters.token_policy = pipeline.spec
            else:
                m.set_tokens(pipeline, sim)

    def trace(self):
        """Simulation with record=True: [(home, experts [T, L, k], weights, calls)] of every home."""
        return [(h, *m.trace()) for h, m in self.members.items() if hasattr(m, "trace")]

    def close(self) -> None:
        for d in self._sim:
            if not d._closed:
                d._closed = True
                d._hook.remove()
        if not self.front._closed:
            try:
                self.front.close(before_group_ends=self._join_service)
            finally:
                self._service = None

    def _join_service(self) -> None:
        """The other homes tell the front's expert service to stop when they stop (the front's stop message)."""
        if self._service is not None:
            self._service.join(timeout=self.front.transport.timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
