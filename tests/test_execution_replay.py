"""The replay (execution/replay.py): hand-counted messages, bytes and hops for both execution models, and exactly
the counters the edge runtime's simulation produces on the same text."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.counters import HEADER_BYTES
from moecompress.execution.replay import Call, decode_calls, prefill_calls, replay
from moecompress.execution.timing import PROFILES, critical_compute, modeled_time, parse_profile

H, ELEM, K = 4, 2, 2


def expert_placement() -> Placement:
    # 3 servers, home 0. MoE layer 0: e0 on 0, e1 on 1, e2 on 2 with a replica on 1, e3 on 1; layer 1: all on 0
    return Placement(memory_bytes=(1000,) * 3, assignment=(((0,), (1,), (2, 1), (1,)), ((0,),) * 4),
                     expert_bytes=((10,) * 4,) * 2, dense_bytes=100, dense_servers=(0,))


def test_expert_model_replay_is_hand_counted():
    # t0 [e0, e1]: e0 at home, e1 on s1.  t1 [e2, e3]: e3 only on s1, so e2 uses its replica there.
    # t2 [e2, e0]: e0 at home; e2's copies (s2, s1) are on no server t2 visits anyway: its primary s2.
    experts = np.array([[[0, 1], [0, 1]], [[2, 3], [2, 3]], [[2, 0], [1, 2]]])  # [T=3, L=2, k=2]
    c = replay(expert_placement(), experts, [Call(3, 1, 5)], H, ELEM)
    row = H * ELEM + K * 8  # hidden row + int32 ids + float32 weights
    assert c.bytes[0, 0, 1] == HEADER_BYTES + 2 * row and c.bytes[0, 1, 0] == 2 * H * ELEM  # 2 rows to s1
    assert c.bytes[0, 0, 2] == HEADER_BYTES + 1 * row and c.bytes[0, 2, 0] == 1 * H * ELEM  # 1 row to s2
    assert c.bytes.sum() == 64 + 48 + 16 + 64 + 24 + 8 == 224
    assert c.messages[0].sum() == 4 and c.messages[1].sum() == 0  # layer 1: every expert at home
    assert c.hops.tolist() == [2, 0]
    assert c.pairs.tolist() == [[2, 3, 1], [6, 0, 0]]
    assert (c.calls, c.tokens) == (1, 3)
    # the same tokens as three decode calls: each call sends its own messages (t0: s1; t1: s1; t2: s2)
    c3 = replay(expert_placement(), experts, [Call(1, 1, j + 1) for j in range(3)], H, ELEM)
    assert c3.messages[0].sum() == 6 and c3.hops.tolist() == [6, 0]
    assert c3.bytes.sum() == 3 * HEADER_BYTES + 3 * row + 3 * H * ELEM


def pipeline_placement() -> Placement:
    # 4 decoder layers on servers 0, 0, 1, 2; MoE layers are decoder layers 1 (server 0) and 3 (server 2)
    return Placement(memory_bytes=(1000,) * 3, assignment=(((0,),) * 4, ((2,),) * 4),
                     expert_bytes=((10,) * 4,) * 2, dense_bytes=150, dense_servers=(0, 1, 2), mode="pipeline",
                     layer_servers=(0, 0, 1, 2), server_dense_bytes=(100, 25, 25))


def test_pipeline_replay_is_hand_counted():
    p = pipeline_placement()
    assert p.home == 0 and p.stages == (0, 1, 2) and p.server_bytes == (140, 25, 65)
    experts = np.zeros((8, 2, K), dtype=np.int64)
    calls = [Call(2, 3, 3), Call(2, 1, 4)]  # a prefill of 2 x 3 tokens, then one decode step of both
    c = replay(p, experts, calls, H, ELEM, moe_decoder_layers=(1, 3))
    first = HEADER_BYTES + 6 * H * ELEM + 6 + 6 * 4  # header, hidden, mask [2, 3] int8, positions int32
    second = HEADER_BYTES + 2 * H * ELEM + 8 + 2 * 4
    back = 6 * H * ELEM + 2 * H * ELEM  # the last stage returns the hidden state only
    assert c.bytes.sum() == 2 * first + 2 * second + back == 2 * 142 + 2 * 96 + 64
    assert c.bytes[2, 0, 1] == first + second and c.bytes[3, 1, 2] == first + second  # 0 -> 1 -> 2
    assert c.bytes[3, 2, 0] == back  # and back to the home, charged to the last layer
    assert c.hops.tolist() == [0, 0, 2, 4] and c.messages.sum() == 6
    assert c.pairs[1].tolist() == [8 * K, 0, 0] and c.pairs[3].tolist() == [0, 0, 8 * K]
    one = Placement(**{**p.__dict__, "assignment": (((0,),) * 4,) * 2, "layer_servers": (0,) * 4,
                       "dense_servers": (0,), "server_dense_bytes": (150, 0, 0)})
    assert replay(one, experts, calls, H, ELEM, (1, 3)).bytes.sum() == 0  # one stage: nothing crosses


def test_replay_refuses_calls_that_do_not_cover_the_trace():
    with pytest.raises(MoecompressError, match="calls hold 2 tokens"):
        replay(expert_placement(), np.zeros((3, 2, K), dtype=np.int64), [Call(2, 1, 1)], H, ELEM)
    with pytest.raises(MoecompressError, match="kv_length"):
        Call(1, 4, 2)
    assert sum(c.tokens for c in prefill_calls(3, 5)) == 15 and decode_calls(3, 2)[-1] == Call(2, 1, 3)


def test_time_model_adds_compute_latency_and_bytes():
    c = replay(expert_placement(), np.array([[[0, 1], [0, 1]]]), [Call(1, 1, 1)], H, ELEM)
    lan = PROFILES["lan"]
    t = modeled_time(c, lan, 0.010)
    assert t.latency == pytest.approx(2 * 0.5e-3) and t.transfer == pytest.approx(c.bytes.sum() / 125e6)
    assert t.seconds == pytest.approx(0.010 + t.latency + t.transfer)
    assert parse_profile("edge=50Mbit/s,2ms") == type(lan)("edge", 50e6 / 8, 2e-3)
    assert parse_profile("wan") == PROFILES["wan"]
    with pytest.raises(MoecompressError, match="NAME=RATE,LATENCY"):
        parse_profile("fast")
    # expert model: each layer costs its busiest rank (the home's pairs overlap the others'); pipeline: the sum
    assert critical_compute([[1.0, 3.0], [2.0, 1.0]], 0.5, "expert") == 0.5 + 3.0 + 2.0
    assert critical_compute([[1.0, 0.0], [0.0, 2.0]], 0.5, "pipeline") == 3.5


@pytest.fixture(scope="module")
def tiny_deployments(tmp_path_factory):
    pytest.importorskip("moecompress.runtime.edge")
    from conftest import _build
    from helpers import quantize_tiny

    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.shard.bundles import write_bundles
    from moecompress.shard.command import checkpoint_layer_sizes
    from moecompress.shard.layers import place_pipeline
    from moecompress.shard.spec import ServerSpec

    tmp = tmp_path_factory.mktemp("replay")
    model = _build("qwen3_moe", num_hidden_layers=3)
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp / "ck", dtype=torch.float32)
    sizes = checkpoint_layer_sizes(tmp / "ck")
    L, E = sizes.expert_bytes.shape
    grid = tuple(tuple(((e + l) % 3,) + (((e + l + 1) % 3,) if e % 3 == 0 else ()) for e in range(E)) for l in range(L))
    expert = Placement(memory_bytes=(10**9,) * 3, assignment=grid, expert_bytes=tuple(map(tuple, sizes.expert_bytes)),
                       dense_bytes=sizes.dense_bytes, dense_servers=(0,))
    write_bundles(tmp / "ck", expert, tmp / "expert")
    pipe = place_pipeline(sizes.expert_bytes, sizes.moe_decoder_layers, sizes.layer_dense_bytes, sizes.head_bytes,
                          ServerSpec(memory_bytes=(10**9,) * 3))
    write_bundles(tmp / "ck", pipe, tmp / "pipeline")
    return tmp, sizes, expert, pipe


IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_expert_replay_equals_the_simulated_runtime_counters(tiny_deployments):
    from moecompress.runtime.edge import deploy

    tmp, sizes, expert, pipe = tiny_deployments
    hidden = 64
    with deploy(tmp / "expert", simulate=True, record=True) as d:
        d(IDS)
        d.generate(IDS, max_new_tokens=3, stop_at_eos=False)
        counts = d.counters.counts()
        experts, _, tokens = d.trace()
        hidden = d.model.config.hidden_size
    calls = [Call(*c) for c in tokens]  # (sequences, new tokens, keys attended) of every forward call
    assert counts["bytes"] and replay(expert, experts, calls, hidden, 4).counts() == counts


@pytest.mark.slow
def test_pipeline_replay_equals_the_simulated_runtime_counters(tiny_deployments):
    pytest.importorskip("moecompress.runtime.edge.pipeline")
    from moecompress.runtime.edge import deploy

    tmp, sizes, expert, pipe = tiny_deployments
    with deploy(tmp / "pipeline", simulate=True, record=True) as d:
        d(IDS)
        d.generate(IDS, max_new_tokens=3, stop_at_eos=False)
        counts = d.counters.counts()
        hidden = d.model.config.hidden_size
        calls = [Call(*c) for c in d.trace()[2]]
    assert calls[:2] == [Call(2, 9, 9)] * 2 and len(calls) == 4
    fake = np.zeros((sum(c.tokens for c in calls), pipe.num_layers, 2), dtype=np.int64)
    assert replay(pipe, fake, calls, hidden, 4, sizes.moe_decoder_layers).counts() == counts
