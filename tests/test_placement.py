"""Expert placement: constraints held, exact optimum matched, traffic cut on planted routing, artifacts exact."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.shard import (
    RoutingStats,
    RoutingTrace,
    ServerSpec,
    compare_placements,
    estimate_traffic,
    expected_traffic,
    parse_servers,
    place_affinity,
    place_contiguous,
    place_greedy_balanced,
    place_ilp,
    place_round_robin,
    replicate_hot,
)
from moecompress.shard.problem import affinity_graph, primaries

BASELINES = (place_contiguous, place_round_robin, place_greedy_balanced)
HIDDEN = 64


def planted_trace(seed: int, tokens=3000, layers=4, experts=16, k=2, clusters=4, noise=0.1, switch=0.05, skew=0.0):
    """Tokens in `clusters` groups; each layer's experts split into clusters (the same split for every seed);
    a token picks its k experts inside its cluster's experts (else, with prob `noise`, anywhere) and changes
    cluster between layers with prob `switch`. `skew` makes the low ids of each cluster more popular."""
    split = [np.random.default_rng(1000 + layer).permutation(experts) for layer in range(layers)]
    members = np.stack([s.reshape(clusters, -1) for s in split])  # [L, C, m]
    m = members.shape[2]
    rng = np.random.default_rng(seed)
    cluster = rng.integers(clusters, size=tokens)
    chosen = np.empty((tokens, layers, k), dtype=np.int64)
    for layer in range(layers):
        cluster = np.where(rng.random(tokens) < switch, rng.integers(clusters, size=tokens), cluster)
        order = np.argsort(rng.random((tokens, m)) - skew * np.arange(m), axis=1)[:, :k]
        chosen[:, layer] = members[layer][cluster[:, None], order]
        anywhere = np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]
        chosen[:, layer] = np.where((rng.random(tokens) < noise)[:, None], anywhere, chosen[:, layer])
    weights = -np.sort(-rng.dirichlet(np.ones(k), size=(tokens, layers)), axis=-1)
    return RoutingTrace(chosen, weights, experts)


def sizes(layers=4, experts=16, seed=0):
    """Bytes per expert: mixed bit-widths, as after allocation."""
    return np.random.default_rng(seed).choice([3000, 4000, 6000], size=(layers, experts))


def equal_spec(expert_bytes, dense=10_000, servers=4, slack=1.3, **options):
    return ServerSpec(memory_bytes=(int(dense + expert_bytes.sum() / servers * slack),) * servers, **options)


def group_balance(placement: Placement, stats: RoutingStats, per_layer: bool) -> float:
    load = np.zeros((stats.num_layers, placement.num_servers))
    for layer in range(stats.num_layers):
        np.add.at(load[layer], primaries(placement).reshape(stats.num_layers, -1)[layer], stats.tokens[layer])
    rows = load if per_layer else load.sum(0, keepdims=True)
    return float((rows.max(1) / rows.mean(1)).max())


@pytest.fixture(scope="module")
def planted():
    calib, held_out = planted_trace(seed=1), planted_trace(seed=2)
    return RoutingStats.from_trace(calib), calib, held_out


ALL = BASELINES + (place_affinity,)


@pytest.mark.parametrize("balance", ["total", "layer"])
@pytest.mark.parametrize("memory", ["equal", "mixed", "single_dense"])
def test_every_expert_placed_and_memory_respected(planted, balance, memory):
    stats, _, _ = planted
    b = sizes()
    if memory == "equal":
        spec = equal_spec(b, balance=balance)
    elif memory == "mixed":
        spec = ServerSpec(memory_bytes=(150_000, 110_000, 90_000, 60_000), balance=balance)
    else:
        spec = equal_spec(b, balance=balance, replicate_dense=False)
    for place in ALL:
        p = replicate_hot(place(stats, b, 10_000, spec), stats, spec)
        for layer in range(4):
            for e in range(16):
                servers = p.servers_of(layer, e)
                assert len(servers) >= 1 and len(set(servers)) == len(servers)
        assert all(used <= cap for used, cap in zip(p.server_bytes, spec.memory_bytes))
        assert p.server_bytes == tuple(
            sum(b[l, e] for l in range(4) for e in range(16) if s in p.servers_of(l, e))
            + (10_000 if s in spec.dense_servers else 0)
            for s in range(4)
        )


def test_replication_fills_spare_memory_without_exceeding_it(planted):
    stats, calib, held_out = planted
    b = sizes()
    spec = equal_spec(b, slack=1.6, balance="layer")
    base = place_affinity(stats, b, 10_000, spec)
    more = replicate_hot(base, stats, spec)
    assert all(m[0] == s[0] for lb, lm in zip(base.assignment, more.assignment) for s, m in zip(lb, lm))
    assert sum(len(s) for layer in more.assignment for s in layer) > 64  # copies were added
    assert all(used <= cap for used, cap in zip(more.server_bytes, spec.memory_bytes))
    assert sum(len(s) for layer in replicate_hot(base, stats, spec, max_replicas=3).assignment for s in layer) == 67
    before, after = (expected_traffic(p, held_out, HIDDEN).bytes_per_token for p in (base, more))
    assert after <= before
    # memory so tight that nothing more fits: nothing added, nothing exceeded
    tight = ServerSpec(memory_bytes=base.server_bytes, balance="layer")
    same = replicate_hot(Placement(**{**base.__dict__, "memory_bytes": base.server_bytes}), stats, tight)
    assert same.assignment == base.assignment


@pytest.mark.parametrize("balance", ["total", "layer"])
@pytest.mark.parametrize("skew", [0.0, 0.15])
def test_load_balance_within_epsilon(planted, balance, skew):
    stats = RoutingStats.from_trace(planted_trace(seed=3, skew=skew))
    b = sizes()
    spec = equal_spec(b, balance=balance, balance_epsilon=0.1)
    per_layer = balance == "layer"
    assert group_balance(place_greedy_balanced(stats, b, 10_000, spec), stats, per_layer) <= 1.1  # feasible
    p = place_affinity(stats, b, 10_000, spec)
    assert group_balance(p, stats, per_layer) <= 1.1 + 1e-9
    replayed = expected_traffic(p, planted_trace(seed=3, skew=skew), HIDDEN)  # the counted tokens themselves
    measured = replayed.layer_balance if per_layer else replayed.balance
    assert measured == pytest.approx(group_balance(p, stats, per_layer))


def random_stats(seed, layers=2, experts=4, k=2, tokens=400):
    rng = np.random.default_rng(seed)
    popular = rng.dirichlet(np.ones(experts) * 0.7, size=layers)  # [L, E]
    chosen = np.stack([
        np.stack([rng.choice(experts, size=k, replace=False, p=popular[layer]) for layer in range(layers)])
        for _ in range(tokens)
    ])
    return RoutingStats.from_trace(RoutingTrace(chosen, np.full(chosen.shape, 1 / k), experts))


TINY = [(2, 4, 2, seed) for seed in range(6)] + [(2, 6, 3, 0), (2, 6, 3, 1)]  # layers, experts, servers, seed


@pytest.mark.parametrize("layers,experts,servers,seed", TINY)
@pytest.mark.parametrize("balance", ["total", "layer"])
def test_ilp_and_heuristic_agree_on_tiny_instances(layers, experts, servers, seed, balance):
    stats = random_stats(seed, layers, experts)
    b = np.full((layers, experts), 1000)
    spec = ServerSpec(memory_bytes=(500 + 1300 * layers * experts // servers,) * servers, balance=balance,
                      balance_epsilon=0.25)
    graph = affinity_graph(stats, b, 500, spec)
    exact = place_ilp(stats, b, 500, spec)
    ours = place_affinity(stats, b, 500, spec)
    assert exact.method == "ilp"
    optimum, found = graph.objective(primaries(exact)), graph.objective(primaries(ours))
    assert optimum <= found + 1e-9
    assert found <= optimum * 1.02 + 1e-9  # measured: equal on all of these but one (0.2 % over)


def test_ilp_and_heuristic_both_zero_on_separable_instance():
    # two groups of experts that never meet, within a layer or across layers: a zero-cut placement exists
    chosen = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]] * 50)  # [T, L=2, k=2], experts 0..7
    stats = RoutingStats.from_trace(RoutingTrace(chosen, np.full(chosen.shape, 0.5), 8))
    b = np.full((2, 8), 1000)
    spec = ServerSpec(memory_bytes=(9000, 9000), balance="layer")
    graph = affinity_graph(stats, b, 1000, spec)
    for p in (place_ilp(stats, b, 1000, spec), place_affinity(stats, b, 1000, spec)):
        assert graph.objective(primaries(p)) == pytest.approx(0.0, abs=1e-12)
        assert expected_traffic(p, RoutingTrace(chosen, np.full(chosen.shape, 0.5), 8), HIDDEN).bytes_per_token == 0


@pytest.mark.parametrize("balance", ["total", "layer"])
def test_affinity_cuts_traffic_on_planted_clusters(planted, balance):
    stats, _, held_out = planted
    b = sizes()
    spec = equal_spec(b, balance=balance)
    baseline = min(expected_traffic(f(stats, b, 10_000, spec), held_out, HIDDEN).bytes_per_token for f in BASELINES)
    ours = expected_traffic(place_affinity(stats, b, 10_000, spec), held_out, HIDDEN)
    assert ours.bytes_per_token <= 0.65 * baseline
    assert ours.balance <= 1.15  # held-out tokens, so a little over the calibrated 1.1


@pytest.mark.parametrize("replicate_dense", [True, False])
def test_too_small_memory_names_the_smallest_that_fits(replicate_dense):
    stats = random_stats(0, layers=2, experts=6)
    b = np.full((2, 6), 1000)  # 12 experts on 4 servers: 3 each
    dense = 700
    need = 3 * 1000 + dense  # max(largest, total / servers) + dense; single dense: 3 experts beside it on one
    spec = ServerSpec(memory_bytes=(need - 1,) * 4, replicate_dense=replicate_dense)
    with pytest.raises(MoecompressError, match=f"smallest memory that fits, the same on every server, is {need} bytes"):
        place_affinity(stats, b, dense, spec)
    for place in ALL:
        p = place(stats, b, dense, ServerSpec(memory_bytes=(need,) * 4, replicate_dense=replicate_dense))
        assert max(p.server_bytes) <= need


def test_placement_json_round_trip_is_exact(planted, tmp_path):
    stats, _, _ = planted
    b = sizes()
    spec = equal_spec(b, slack=1.5, devices_per_server=2)
    p = replicate_hot(place_affinity(stats, b, 10_000, spec), stats, spec)
    p = Placement(**{**p.__dict__, "files": {0: {"model.safetensors": "ab" * 32}, 3: {"config.json": "cd" * 32}}})
    p.save(tmp_path / "placement.json")
    back = Placement.load(tmp_path / "placement.json")
    assert back == p
    assert json.dumps(back.to_json()) == json.dumps(p.to_json())
    assert (tmp_path / "placement.json").read_text() == json.dumps(p.to_json(), indent=1)
    assert back.servers_of(1, 5) == p.assignment[1][5]
    doctored = p.to_json()
    doctored["server_bytes"][0] += 1
    with pytest.raises(MoecompressError, match="server_bytes"):
        Placement.from_json(doctored)
    doctored = p.to_json()
    doctored["memory_bytes"][0] = 10
    with pytest.raises(MoecompressError, match="over its memory"):
        Placement.from_json(doctored)


def test_hierarchical_devices_respect_device_memory(planted):
    stats, _, held_out = planted
    b = sizes()
    spec = equal_spec(b, slack=1.4, devices_per_server=2, balance="layer")
    p = place_affinity(stats, b, 10_000, spec)
    assert p.devices_per_server == 2 and len(p.devices) == 4
    for (s, d), used in p.device_bytes().items():
        assert used <= (spec.memory_bytes[s] - 10_000) // 2
    assert {d for layer in p.devices for ds in layer for d in ds} == {0, 1}
    flat = place_affinity(stats, b, 10_000, ServerSpec(**{**spec.__dict__, "devices_per_server": 1}))
    assert flat.assignment == p.assignment  # servers first; devices only split each server's experts


def test_replay_counts_messages_exactly():
    # 3 servers; layer 0: experts 0 (s0) and 1 (s1); layer 1: experts 0 (s2) and 1 (s2)
    p = Placement(
        memory_bytes=(100, 100, 100),
        assignment=(((0,), (1,)), ((2,), (2,))),
        expert_bytes=((10, 10), (10, 10)),
        dense_bytes=0,
        dense_servers=(0, 1, 2),
    )
    trace = RoutingTrace(np.array([[[0, 1], [0, 1]]]), np.array([[[0.3, 0.7], [0.5, 0.5]]]), 2)
    # layer 0: enters at s1 (weight 0.7); dispatch to s0, gather on s1: 2 messages
    # layer 1: at s1, both experts on s2: dispatch 1, gather on s2: 0 -> 1 message
    r = expected_traffic(p, trace, hidden_size=10, payload_bytes=2, link_bandwidth=20.0)
    assert r.messages_per_token == 3
    assert r.bytes_per_layer == (40.0, 20.0) and r.bytes_per_token == 60.0 and r.seconds_per_token == 3.0
    assert r.server_load == (1, 1, 2) and r.local_fraction == 0.0
    single = Placement(**{**p.__dict__, "dense_servers": (0,)})  # tokens live on s0: 2 x remote servers
    assert expected_traffic(single, trace, 10, 2).messages_per_token == 2 * 1 + 2 * 1
    copy = Placement(**{**p.__dict__, "assignment": (((0,), (1, 0)), ((2,), (2, 1)))})
    # layer 0: ingress s1; expert 0 only on s0 (visited anyway) so expert 1 uses its copy there too: S = {s0}
    assert expected_traffic(copy, trace, 10, 2).messages_per_token == (1 + 0) + (1 + 0)


def test_parse_servers():
    assert parse_servers("4x64MB").memory_bytes == (64_000_000,) * 4
    spec = parse_servers("64MB, 64MB,32MiB", balance_epsilon=0.2, link_bandwidth=1e8)
    assert spec.memory_bytes == (64_000_000, 64_000_000, 32 * 2**20) and spec.num_servers == 3
    assert spec.balance_epsilon == 0.2 and spec.link_bandwidth == 1e8
    assert parse_servers("2x1.5GB,512").memory_bytes == (1_500_000_000, 1_500_000_000, 512)
    for bad in ("", "4x", "0x64MB", "64XB", "-1MB", "4x64MB,,"):
        with pytest.raises(MoecompressError):
            parse_servers(bad)
    with pytest.raises(MoecompressError, match="balance"):
        parse_servers("2x1GB", balance="pipeline")
    assert parse_servers("3x1GB", replicate_dense=False).dense_servers == (0,)
    assert parse_servers("1GB,2GB,2GB", replicate_dense=False).dense_servers == (1,)


def test_comparison_table(planted):
    stats, _, held_out = planted
    b = sizes()
    rows = compare_placements(stats, held_out, b, 10_000, equal_spec(b), HIDDEN, replicate=True)
    assert [r["method"] for r in rows] == [
        "contiguous", "contiguous+replicas", "round_robin", "round_robin+replicas",
        "greedy_balanced", "greedy_balanced+replicas", "affinity", "affinity+replicas",
    ]
    ours = next(r for r in rows if r["method"] == "affinity")
    assert ours["reduction"] >= 0.35
    assert max(r["reduction"] for r in rows if r["method"] in ("contiguous", "round_robin", "greedy_balanced")) == 0
    assert 0.5 * ours["bytes_per_token"] <= ours["estimate"] <= 1.5 * ours["bytes_per_token"] + 1


def test_estimate_is_exact_for_one_expert_per_token():
    chosen = np.random.default_rng(0).integers(0, 8, size=(500, 3, 1))
    trace = RoutingTrace(chosen, np.ones(chosen.shape), 8)
    stats = RoutingStats.from_trace(trace)
    b = np.full((3, 8), 100)
    p = place_round_robin(stats, b, 0, ServerSpec(memory_bytes=(10_000,) * 4))
    assert estimate_traffic(p, stats, HIDDEN) == pytest.approx(expected_traffic(p, trace, HIDDEN).bytes_per_token)


def test_stats_from_trace_count_exactly():
    trace = planted_trace(seed=5, tokens=200, layers=3, experts=8, k=3, clusters=2)
    stats = RoutingStats.from_trace(trace)
    tokens, coact, paths = np.zeros((3, 8)), np.zeros((3, 8, 8)), np.zeros((2, 8, 8))
    for t in range(200):
        for layer in range(3):
            for i in trace.experts[t, layer]:
                tokens[layer, i] += 1
                for j in trace.experts[t, layer]:
                    coact[layer, i, j] += i != j
                if layer < 2:
                    for j in trace.experts[t, layer + 1]:
                        paths[layer, i, j] += 1
    assert (stats.tokens == tokens).all() and (stats.coact == coact).all() and (stats.paths == paths).all()
    assert stats.num_tokens == 200 and stats.top_k == 3
