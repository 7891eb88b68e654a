"""Home replicas (shard/home.py): each layer's hottest experts get a copy on the home inside the same memory; the
runtime computes on those copies first (no round trip for a layer whose chosen experts all have home copies);
outputs stay the lossless ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.replay import decode_calls, replay
from moecompress.shard import LayerSizes, RoutingStats, RoutingTrace, ServerSpec, place
from moecompress.shard.home import hottest_experts, min_home_memory, place_home_replicas

L, E, K, N, T = 3, 8, 2, 4, 400
SIZE = 1000


def problem(slack: float = 1.5):
    """A trace whose expert e of every layer is drawn with probability ~ (e + 1)^-1.2 (hot: low ids, shuffled per
    layer), sizes of SIZE bytes each, 4 servers of dense + slack x their share of the experts."""
    rng = np.random.default_rng(0)
    experts = np.zeros((T, L, K), dtype=np.int64)
    order = [rng.permutation(E) for _ in range(L)]
    p = (np.arange(E) + 1.0) ** -1.2
    for layer in range(L):
        for t in range(T):
            experts[t, layer] = order[layer][rng.choice(E, K, replace=False, p=p / p.sum())]
    stats = RoutingStats.from_trace(RoutingTrace(experts, np.full(experts.shape, 0.5, np.float32), E))
    sizes = LayerSizes(expert_bytes=np.full((L, E), SIZE, dtype=np.int64), moe_decoder_layers=tuple(range(L)),
                       layer_dense_bytes=(100,) * L, head_bytes=200)
    memory = int(sizes.dense_bytes + slack * L * E * SIZE / N)
    return experts, stats, sizes, ServerSpec(memory_bytes=(memory,) * N, mode="expert"), order


def test_hottest_experts_get_home_copies_at_equal_memory():
    experts, stats, sizes, spec, order = problem()
    hot = hottest_experts(stats, 2)
    assert hot == [[int(e) for e in np.argsort(-stats.tokens[layer], kind="stable")[:2]] for layer in range(L)]
    assert all(set(h) == set(order[layer][:2].tolist()) for layer, h in enumerate(hot))  # the drawn hot ones
    p = place_home_replicas(stats, sizes, spec, None, 2)
    assert p.memory_bytes == spec.memory_bytes  # equal memory: the reserve came out of the home's own bytes
    p.check_memory()
    assert all(p.home in p.assignment[layer][e] for layer in range(L) for e in hot[layer])
    assert "+home2" in p.method
    primaries = place(stats, sizes, spec, None, replicate=False)
    assert sum(len(s) for layer in p.assignment for s in layer) > sum(len(s) for layer in primaries.assignment
                                                                       for s in layer)
    assert place_home_replicas(stats, sizes, spec, None, 0).assignment == place(stats, sizes, spec, None).assignment
    # the home computes the hot experts' pairs: a bigger share of the routing weight is local than without
    share = [float(replay(q, experts, decode_calls(T, 1), 16, 2).pairs[:, q.home].sum()) / (T * L * K)
             for q in (place(stats, sizes, spec, None), p)]
    assert share[1] > share[0]
    assert Placement.from_json(p.to_json()).assignment == p.assignment  # recorded in placement.json


def test_too_many_home_replicas_is_a_clear_error_and_min_home_memory_is_exact():
    _, stats, sizes, spec, _ = problem()
    with pytest.raises(MoecompressError, match="home replicas"):
        place_home_replicas(stats, sizes, spec, None, 6)  # 18 of 24 experts on the home: over its 1.5/4 share
    with pytest.raises(MoecompressError, match="allowed: 0..8"):
        hottest_experts(stats, 9)
    need = min_home_memory(stats, sizes, spec, 6, tolerance=1)
    grown = ServerSpec(memory_bytes=(need,) + spec.memory_bytes[1:], mode="expert")
    p = place_home_replicas(stats, sizes, grown, None, 6, replicate=False)
    assert p.memory_bytes[0] == need and p.server_bytes[0] <= need
    with pytest.raises(MoecompressError):
        place_home_replicas(stats, sizes, ServerSpec(memory_bytes=(need - 1,) + spec.memory_bytes[1:], mode="expert"),
                            None, 6, replicate=False)
    assert min_home_memory(stats, sizes, spec, 1) == spec.memory_bytes[0]  # fits already


def test_a_layer_whose_chosen_experts_all_have_home_copies_costs_no_round_trip():
    """Replay (the runtime's route_pairs and counters): tokens choosing only hot experts at layer 0 send nothing
    there; the other layers still do."""
    experts, stats, sizes, spec, _ = problem()
    p = place_home_replicas(stats, sizes, spec, None, 2, replicate=False)
    hot = hottest_experts(stats, 2)
    trace = experts.copy()
    trace[:, 0] = hot[0]  # every token picks exactly layer 0's two hottest experts
    c = replay(p, trace, decode_calls(T, 1), 16, 2)
    assert c.hops[0] == 0 and c.messages[0].sum() == 0 and c.pairs[0, p.home] == T * K
    assert c.hops[1:].sum() > 0
    without = replay(place(stats, sizes, spec, None), trace, decode_calls(T, 1), 16, 2)
    assert without.hops[0] == 2 * T  # shard's placement without home replicas: one round trip per token there


def test_runtime_uses_home_copies_first_and_outputs_stay_lossless(tmp_path_factory):
    """The edge runtime (simulation) on bundles whose middle layer has a home copy of every expert: that layer
    sends no request and computes every pair on the home; logits equal the reference with tokens off and with the
    lossless `native` policy (whose counters show no remote token there)."""
    from edge_bundles import IDS, MASK, checkpoint, run_calls

    from moecompress.runtime.edge import deploy
    from moecompress.shard.bundles import write_bundles
    from moecompress.shard.command import checkpoint_sizes

    ck, ref_logits, ref_tokens = checkpoint(tmp_path_factory)
    expert_bytes, dense_bytes = checkpoint_sizes(ck)
    layers, experts = expert_bytes.shape
    grid = tuple(tuple(((e + layer) % 3,) + ((0,) if layer == 1 and (e + layer) % 3 != 0 else ())
                       for e in range(experts)) for layer in range(layers))
    out = tmp_path_factory.mktemp("home") / "out"
    write_bundles(ck, Placement(memory_bytes=(10**9,) * 3, assignment=grid,
                                expert_bytes=tuple(tuple(int(b) for b in row) for row in expert_bytes),
                                dense_bytes=int(dense_bytes), dense_servers=(0,)), out)
    with deploy(out, simulate=True, verify=False) as d:
        logits, tokens, counts = run_calls(d)
        assert (logits - ref_logits).abs().max() <= 1e-5 and torch.equal(tokens, ref_tokens)
        messages, pairs = np.array(counts["messages"]), np.array(counts["pairs"])
        assert messages[1].sum() == 0 and pairs[1, 1:].sum() == 0 and pairs[1, 0] > 0
        assert messages[0].sum() > 0 and messages[2].sum() > 0
        d.set_tokens("native")
        d.reset_counters()
        assert torch.equal(d(IDS, MASK), logits)
        tok = d.counters.token_counts()
    assert tok["remote_tokens"][1] == 0 and tok["remote_tokens"][0] > 0 and tok["pruned_pairs"] == [0] * layers


def test_low_bit_home_copies_fit_at_equal_memory_where_full_size_ones_do_not():
    from dataclasses import replace

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.shard.home import home_bit_plan

    experts, stats, sizes, spec, order = problem(slack=1.25)  # 7.5 experts' bytes per server
    hot = hottest_experts(stats, 4)
    with pytest.raises(MoecompressError, match="home replicas need 12000 bytes"):
        place_home_replicas(stats, sizes, spec, None, 4)
    low = sizes.expert_bytes.copy()
    for layer, ids in enumerate(hot):
        low[layer, ids] = SIZE // 2  # the hot experts at half the bits
    p = place_home_replicas(stats, replace(sizes, expert_bytes=low), spec, None, 0, hot=hot)
    assert p.memory_bytes == spec.memory_bytes
    p.check_memory()
    assert all(p.home in p.assignment[layer][e] for layer in range(L) for e in hot[layer])
    assert p.server_bytes[p.home] <= spec.memory_bytes[p.home]
    plan = BitPlan(group_size=64, symmetric=False, experts={f"l{i}": {"gate_up": (8,) * E, "down": (8,) * E}
                                                             for i in range(L)})
    mixed = home_bit_plan(plan, [f"l{i}" for i in range(L)], hot, 4)
    for i in range(L):
        for proj in ("gate_up", "down"):
            assert mixed.experts[f"l{i}"][proj] == tuple(4 if e in hot[i] else 8 for e in range(E))
    with pytest.raises(MoecompressError, match="unsupported bits 5"):
        home_bit_plan(plan, [f"l{i}" for i in range(L)], hot, 5)
    with pytest.raises(MoecompressError, match="lists of expert ids"):
        place_home_replicas(stats, sizes, spec, None, 0, hot=[[E]] * L)
