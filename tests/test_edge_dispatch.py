"""The dispatcher's few-token path (a decode step on Python lists): the same routing, messages, sums and counts as
the tensor path, on random placements with replicas."""
from __future__ import annotations

import numpy as np
import torch

from moecompress.execution.counters import Counters
from moecompress.execution.routing import ExpertTables, route_few, route_pairs
from moecompress.runtime.edge import dispatcher as D
from moecompress.runtime.edge.dispatcher import DispatchedExperts
from moecompress.runtime.edge.rank_model import ExpertServer
from moecompress.runtime.edge.transport import InProcess


def random_tables(L: int, E: int, N: int, seed: int) -> ExpertTables:
    g = torch.Generator().manual_seed(seed)
    assignment = []
    for _ in range(L):
        layer = []
        for _ in range(E):
            copies = 1 + int(torch.randint(0, 3, (1,), generator=g))  # 1-3 copies, primary first
            layer.append(tuple(torch.randperm(N, generator=g)[:copies].tolist()))
        assignment.append(tuple(layer))
    return ExpertTables.from_assignment(assignment, N)


def test_route_few_equals_route_pairs():
    for seed in range(20):
        t = random_tables(3, 16, 4, seed)
        g = torch.Generator().manual_seed(100 + seed)
        ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(9)])  # [T=9, k=4]
        for layer in range(3):
            for home in range(4):
                want = route_pairs(t.holds[layer], t.primary[layer], ids, torch.full((9,), home))
                got = route_few(t.holders[layer], t.primaries[layer], ids.tolist(), home)
                assert got == want.tolist()


class Experts(torch.nn.Module):
    """A stand-in experts module: expert e multiplies by (e + 1); id E (not here) contributes nothing."""

    def __init__(self, E: int):
        super().__init__()
        self.E = E

    def forward(self, hidden, ids, weights):
        scale = torch.where(ids < self.E, ids.float() + 1, torch.zeros_like(ids, dtype=torch.float))
        return (hidden.float() * (scale * weights.float()).sum(1, keepdim=True)).to(hidden.dtype)


def test_few_token_path_equals_the_tensor_path(monkeypatch):
    L, E, N, H, k = 2, 16, 4, 8, 4
    t = random_tables(L, E, N, 7)
    g = torch.Generator().manual_seed(3)
    for T in (1, 3, 7):
        hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        weights = torch.rand(T, k, generator=g)
        results = []
        for few in (D.FEW_TOKENS, 0):
            monkeypatch.setattr(D, "FEW_TOKENS", few)
            servers = {n: ExpertServer(n, 0, {layer: Experts(E) for layer in range(L)}) for n in range(1, N)}
            counters = Counters(N, L)
            transport = InProcess(0, servers, N)
            recorder = []
            out = [DispatchedExperts(layer, Experts(E), t, 0, transport, counters, recorder)(hidden, ids, weights)
                   for layer in range(L)]
            results.append((out, counters.counts(), recorder))
        (a, ca, ra), (b, cb, rb) = results
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert {k_: str(v) for k_, v in ca.items()} == {k_: str(v) for k_, v in cb.items()}
        assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(ra, rb))
        assert np.asarray(ca["messages"]).sum() > 0 and np.asarray(ca["pairs"])[:, 0].sum() > 0  # remote and home


ECHO_SERVER = """
import sys, torch, torch.distributed as dist
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.transport import init_group, recv_request
device = init_group(sys.argv[1], 1, 2, 60.0)
buffer = wire.first_buffer(True, device)  # one receive buffer for every request, as the serve loop keeps it
for _ in range(3):  # each request back as [op, payload bytes, payload sum]
    _, head, payload = recv_request(0, device, buffer)
    dist.send(torch.tensor([head[0], payload.numel(), int(payload.long().sum())], dtype=torch.int64), 0)
dist.destroy_process_group()
"""


def test_a_request_is_one_gloo_message_when_it_fits(tmp_path):
    import subprocess
    import sys

    import torch.distributed as dist

    from moecompress.runtime.edge import wire
    from moecompress.runtime.edge.transport import init_group, send_request

    small = torch.arange(300, dtype=torch.uint8)
    big = (torch.arange(wire.FRAME_BYTES + 1000) % 251).to(torch.uint8)
    head_small, head_big = wire.header(wire.OP_ADMIT, a=small.numel()), wire.header(wire.OP_ADMIT, a=big.numel())
    assert [p.numel() for p in wire.frame(head_small, small, True)] == [64 + 300]  # one message
    assert [p.numel() for p in wire.frame(head_big, big, True)] == [8, big.numel()]  # too big: header, then payload
    assert [p.numel() for p in wire.frame(head_small, small, False)] == [8, 300]  # NCCL: always two
    assert [p.numel() for p in wire.frame(wire.header(wire.OP_PING), None, True)] == [8]
    first = wire.first_buffer(True, "cpu")
    first[:364] = wire.frame(head_small, small, True)[0]
    head, payload = wire.unframe(first, True)
    assert head == head_small.tolist() and torch.equal(payload, small)
    first[:64] = wire.as_bytes(head_big)
    assert wire.unframe(first, True)[1] is None  # the payload follows
    init = f"file://{tmp_path / 'rendezvous'}"  # the real thing: gloo between two processes
    child = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, init])
    try:
        device = init_group(init, 0, 2, 60.0)
        got = []
        for head, payload in ((head_small, small), (head_big, big), (wire.header(wire.OP_PING), None)):
            send_request(1, head, payload, device)
            answer = torch.empty(3, dtype=torch.int64)
            dist.recv(answer, 1)
            got.append(answer.tolist())
        dist.destroy_process_group()
        assert got == [[wire.OP_ADMIT, 300, int(small.long().sum())],
                       [wire.OP_ADMIT, big.numel(), int(big.long().sum())], [wire.OP_PING, 0, 0]]
    finally:
        assert child.wait(timeout=60) == 0
