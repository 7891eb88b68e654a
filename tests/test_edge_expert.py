"""The edge runtime, expert model: bundles run across servers equal the single-process model (float32), in one
process (simulation) and in real gloo processes on loopback; the simulation counts exactly what the real run sends;
bad deployments are refused before any exchange; a dead or hung server is named within the timeout."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from edge_bundles import IDS, MASK, checkpoint, expert_bundles, processes_equal_simulation, run_calls

import moecompress
from moecompress.errors import MoecompressError
from moecompress.execution.counters import HEADER_BYTES, expert_message_bytes
from moecompress.runtime.edge import deploy, wire
from moecompress.runtime.edge.bundle import read_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ck, logits, tokens = checkpoint(tmp_path_factory)
    for n in (2, 4):
        expert_bundles(ck, ck.parent / f"out{n}", n)
    return ck.parent, logits, tokens


def test_wire_sizes_are_the_counted_sizes():
    hidden, ids, w = torch.randn(5, 64), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    request, reply = expert_message_bytes(5, 64, 2, 4)
    assert wire.encode_request(hidden, ids, w).numel() + HEADER_BYTES == request
    assert wire.as_bytes(hidden).numel() == reply
    h, i, ww = wire.decode_request(wire.encode_request(hidden, ids, w), 5, 64, 2, torch.float32)
    assert torch.equal(h, hidden) and torch.equal(i, ids) and torch.equal(ww, w)


def test_simulation_equals_single_process_model(built):
    tmp, ref_logits, ref_tokens = built
    with deploy(tmp / "out2", simulate=True) as d:
        logits, tokens, counts = run_calls(d)
        assert d.counters.pairs[:, 1].sum() > 0  # server 1 really computed pairs
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    replicas = sum(len(c) > 1 for layer in read_bundle(tmp / "out2", 0).assignment for c in layer)
    assert replicas > 0 and sum(map(sum, counts["bytes"][0])) > 0


def test_bfloat16_within_rounding_of_the_single_process_model(built):
    """bf16: each server's partial sum is rounded to bf16 before the home adds it, so logits may differ by a few
    bf16 ulps (stated bound 0.02 on these logits of magnitude < 1), less than bf16's own error against float32."""
    tmp, ref32, _ = built
    full = moecompress.from_pretrained(tmp / "ck", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = full(input_ids=IDS, attention_mask=MASK).logits.float()
    with deploy(tmp / "out2", simulate=True, dtype=torch.bfloat16) as d:
        got = d(IDS, MASK).float()
    assert (got - ref).abs().max() <= 0.02
    assert (got - ref).abs().max() <= (ref - ref32).abs().max()


def test_replay_of_the_recorded_trace_predicts_the_counts_exactly(built):
    from moecompress.artifacts.placement import Placement
    from moecompress.execution.replay import Call, replay

    tmp, _, _ = built
    with deploy(tmp / "out4", simulate=True, record=True) as d:
        _, _, counts = run_calls(d)
        experts, _, calls = d.trace()
    predicted = replay(Placement.load(tmp / "out4" / "placement.json"), experts, [Call(*c) for c in calls], 64, 4)
    assert predicted.counts() == counts


def test_two_processes_equal_model_and_simulation_counts(built):
    tmp, ref_logits, ref_tokens = built
    with deploy(tmp / "out2", simulate=True) as d:
        _, _, sim_counts = run_calls(d)
    with deploy(tmp / "out2", simulate=False, timeout=60) as d:
        logits, tokens, counts = run_calls(d)
        assert (logits - ref_logits).abs().max() <= 1e-5
        assert torch.equal(tokens, ref_tokens)
        assert counts == sim_counts
        assert d.counters.peak_memory_bytes[1] > 0
        # a server that dies is named, within the timeout
        pid = d.servers.procs[1].pid
        os.kill(pid, signal.SIGKILL)
        d.servers.procs[1].wait(10)
        with pytest.raises(MoecompressError, match="server 1"):
            d(IDS, MASK)


def test_hung_server_is_named_within_the_timeout(built):
    tmp, _, _ = built
    with deploy(tmp / "out2", simulate=False, timeout=4) as d:
        d(IDS, MASK)
        proc = d.servers.procs[1]
        os.kill(proc.pid, signal.SIGSTOP)  # alive but silent
        start = time.monotonic()
        with pytest.raises(MoecompressError, match="server 1 did not answer within 4 s"):
            d(IDS, MASK)
        assert time.monotonic() - start < 30
        assert proc.poll() is not None  # the deployment stopped its servers
        with pytest.raises(MoecompressError, match="closed"):
            d(IDS, MASK)


@pytest.mark.slow
def test_four_processes_equal_model_and_simulation_counts(built):
    tmp, ref_logits, ref_tokens = built
    processes_equal_simulation(tmp / "out4", ref_logits, ref_tokens)


def test_refusals_before_any_exchange(built, tmp_path):
    tmp, _, _ = built
    out = tmp_path / "copy"
    shutil.copytree(tmp / "out2", out)
    with pytest.raises(MoecompressError, match="not a full model"):
        moecompress.from_pretrained(out / "server-1", dtype=torch.float32)
    with pytest.raises(MoecompressError, match="2 servers"):
        deploy(out, simulate=True, servers=3)
    with pytest.raises(MoecompressError, match="2 servers but 3 processes"):
        read_bundle(out, 1, world_size=3)
    (out / "server-0").rename(out / "swap")
    (out / "server-1").rename(out / "server-0")
    with pytest.raises(MoecompressError, match="server 1's bundle, not server 0's"):
        read_bundle(out, 0)
    (out / "server-0").rename(out / "server-1")
    with pytest.raises(MoecompressError, match="missing"):
        read_bundle(out, 0)
    (out / "swap").rename(out / "server-0")
    doc = json.loads((out / "placement.json").read_text())
    (out / "placement.json").write_text(json.dumps(doc))  # same content, other bytes: another placement file
    with pytest.raises(MoecompressError, match="another placement"):
        deploy(out, simulate=True)


@pytest.mark.slow
def test_a_refusing_server_process_is_named(built, tmp_path):
    tmp, _, _ = built
    out = tmp_path / "bad"
    shutil.copytree(tmp / "out2", out)
    f = out / "server-1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match="server 1 exited with code 2.*sha256"):
        deploy(out, simulate=False, timeout=30)
