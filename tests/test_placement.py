"""Placement: constraints held, exact optimum matched, traffic cut on planted routing (measured by the replay of the
expert execution model), pipeline ranges contiguous and optimal, artifacts exact (old files still load)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.replay import Call, replay
from moecompress.shard import (
    LayerSizes,
    RoutingStats,
    RoutingTrace,
    ServerSpec,
    compare_placements,
    parse_servers,
    place,
    place_affinity,
    place_contiguous,
    place_greedy_balanced,
    place_ilp,
    place_round_robin,
    replicate_hot,
    traffic_row,
)
from moecompress.shard.layers import balanced_cuts
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


def measured(placement: Placement, trace: RoutingTrace, tokens_per_call: int = 1) -> dict:
    """The replayed traffic of `trace` (calls of `tokens_per_call` tokens) in the placement's execution model."""
    calls = [Call(1, tokens_per_call, tokens_per_call)] * (trace.num_tokens // tokens_per_call)
    experts = trace.experts[: len(calls) * tokens_per_call]
    return traffic_row(placement, replay(placement, experts, calls, HIDDEN, 2))


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
    before, after = (measured(p, held_out)["bytes_per_token"] for p in (base, more))
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
    replayed = measured(p, planted_trace(seed=3, skew=skew))  # the counted tokens themselves
    assert replayed["layer_balance" if per_layer else "balance"] == pytest.approx(group_balance(p, stats, per_layer))


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
    assert found <= optimum + 0.02 * abs(optimum) + 1e-9


def test_ilp_and_heuristic_both_optimal_on_separable_instance():
    # two groups of experts that never meet: the best expert-model placement keeps one group on the home (free)
    # and the other together on the remote server (one row out and one back per token and layer)
    chosen = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]] * 50)  # [T, L=2, k=2], experts 0..7
    trace = RoutingTrace(chosen, np.full(chosen.shape, 0.5), 8)
    stats = RoutingStats.from_trace(trace)
    b = np.full((2, 8), 1000)
    spec = ServerSpec(memory_bytes=(9000, 9000), balance="layer")
    graph = affinity_graph(stats, b, 1000, spec)
    exact, ours = place_ilp(stats, b, 1000, spec), place_affinity(stats, b, 1000, spec)
    assert graph.objective(primaries(ours)) == pytest.approx(graph.objective(primaries(exact)), abs=1e-12)
    for p in (exact, ours):
        assert measured(p, trace)["messages_per_token"] == 2.0  # half the tokens: 2 layers x 2 messages


CUT = {"total": 0.65, "layer": 0.8}  # measured: 0.56 and 0.62 of the best baseline


@pytest.mark.parametrize("balance", ["total", "layer"])
def test_affinity_cuts_traffic_on_planted_clusters(planted, balance):
    stats, _, held_out = planted
    b = sizes()
    spec = equal_spec(b, balance=balance)
    baseline = min(measured(f(stats, b, 10_000, spec), held_out)["bytes_per_token"] for f in BASELINES)
    ours = measured(place_affinity(stats, b, 10_000, spec), held_out)
    assert ours["bytes_per_token"] <= CUT[balance] * baseline
    assert ours["balance"] <= 1.15  # held-out tokens, so a little over the calibrated 1.1


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


def test_old_placement_json_loads_as_the_expert_model(planted):
    stats, _, _ = planted
    b = sizes()
    doc = place_affinity(stats, b, 10_000, equal_spec(b, replicate_dense=False)).to_json()
    for key in ("mode", "home", "layer_servers", "server_dense_bytes"):  # a file written before these existed
        doc.pop(key)
    old = Placement.from_json(doc)
    assert old.mode == "expert" and old.home == old.dense_servers[0] == 0 and old.layer_servers == ()
    assert Placement.from_json(old.to_json()) == old


def pipeline_sizes(layers=5, experts=4, seed=0) -> LayerSizes:
    rng = np.random.default_rng(seed)
    return LayerSizes(expert_bytes=rng.choice([300, 400, 600], size=(layers, experts)),
                      moe_decoder_layers=tuple(range(layers)),
                      layer_dense_bytes=tuple(int(x) for x in rng.integers(100, 900, size=layers)), head_bytes=1500)


def brute_force_cuts(layer_bytes, head, memory):
    """Smallest max(bytes / memory) over every way to cut the layers into len(memory) non-empty ranges."""
    from itertools import combinations

    D, m, best = len(layer_bytes), len(memory), None
    for inner in combinations(range(1, D), m - 1):
        ends = [*inner, D]
        held = [sum(layer_bytes[lo:hi]) + (head if s == 0 else 0) for s, (lo, hi) in enumerate(zip([0, *inner], ends))]
        if all(h <= c for h, c in zip(held, memory)):
            value = max(h / c for h, c in zip(held, memory))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_pipeline_ranges_contiguous_within_memory_and_optimal(seed):
    sz = pipeline_sizes(seed=seed)
    layer_bytes = np.array(sz.layer_dense_bytes) + sz.expert_bytes.sum(1)
    memory = (int((layer_bytes.sum() + 1500) / 3 * 1.5), int((layer_bytes.sum() + 1500) / 3 * 1.3),
              int((layer_bytes.sum() + 1500) / 3 * 1.6))
    spec = ServerSpec(memory_bytes=memory)
    p = place(None, sz, ServerSpec(**{**spec.__dict__, "mode": "pipeline"}), "all_servers")
    assert p.mode == "pipeline" and p.stages == (0, 1, 2) and p.home == 0
    assert list(p.layer_servers) == sorted(p.layer_servers)  # contiguous ranges, in order
    assert all(p.servers_of(l, e) == (p.layer_servers[l],) for l in range(5) for e in range(4))
    assert all(u <= m for u, m in zip(p.server_bytes, memory))
    assert sum(p.server_bytes) == layer_bytes.sum() + 1500  # every byte held once
    worst = max(u / m for u, m in zip(p.server_bytes, memory))
    assert worst == pytest.approx(brute_force_cuts(layer_bytes.tolist(), 1500, list(memory)))
    back = Placement.from_json(p.to_json())
    assert back == p and back.server_dense_bytes == p.server_dense_bytes


def test_fewest_servers_uses_fewer_stages_when_memory_allows():
    sz = pipeline_sizes()
    total = int(np.array(sz.layer_dense_bytes).sum() + sz.expert_bytes.sum() + sz.head_bytes)
    spec = ServerSpec(memory_bytes=(int(total * 0.6),) * 4, mode="pipeline")
    few, every = place(None, sz, spec, "fewest_servers"), place(None, sz, spec, "all_servers")
    assert len(few.stages) == 2 and len(every.stages) == 4
    assert few.server_bytes[2:] == (0, 0) and all(u <= m for u, m in zip(few.server_bytes, spec.memory_bytes))
    trace = RoutingTrace(np.zeros((6, 5, 2), dtype=np.int64), np.ones((6, 5, 2)), 4)
    assert measured(few, trace)["hops_per_call"] == 2 and measured(every, trace)["hops_per_call"] == 4
    with pytest.raises(MoecompressError, match="smallest memory that fits"):
        place(None, sz, ServerSpec(memory_bytes=(total // 5,) * 4, mode="pipeline"))
    assert balanced_cuts(np.array([5, 5]), 0, [4, 100]) is None


def test_methods_and_modes_are_named_in_errors(planted):
    stats, _, _ = planted
    sz = pipeline_sizes(layers=4, experts=16)
    with pytest.raises(MoecompressError, match="allowed: all_servers, fewest_servers"):
        place(stats, sz, ServerSpec(memory_bytes=(10**6,) * 2, mode="pipeline"), "affinity")
    with pytest.raises(MoecompressError, match="allowed: contiguous, round_robin, greedy_balanced, affinity, ilp"):
        place(stats, sz, ServerSpec(memory_bytes=(10**6,) * 2), "greedy")
    with pytest.raises(MoecompressError, match="mode must be one of expert, pipeline"):
        ServerSpec(memory_bytes=(10,), mode="tensor")
    with pytest.raises(MoecompressError, match="placement mode 'ring'; allowed: expert, pipeline"):
        Placement(memory_bytes=(10,), assignment=(((0,),),), expert_bytes=((1,),), dense_bytes=0, dense_servers=(0,),
                  mode="ring")
    assert place(stats, sz, ServerSpec(memory_bytes=(10**6,) * 2), "greedy_balanced").method == \
        "greedy_balanced+replicas"


def test_cli_names_allowed_methods(capsys):
    from moecompress.cli import parser

    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["shard", "--model", "m", "--stats", "s", "--servers", "2x1GB", "--out", "o",
                             "--method", "greedy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'greedy'" in err and "greedy_balanced" in err and "fewest_servers" in err
    args = parser().parse_args(["shard", "--model", "m", "--stats", "s", "--servers", "2x1GB", "--out", "o"])
    assert (args.mode, args.method, args.balance, args.link, args.batch) == ("auto", None, "total", None, 1)
    from moecompress.cli import main

    assert main(["shard", "--model", "m", "--stats", "s", "--servers", "2x1GB", "--out", "o", "--mode", "pipeline",
                 "--method", "affinity"]) == 2  # refused before any file is read
    assert capsys.readouterr().err.strip() == ("error: placement method 'affinity' does not exist for mode pipeline; "
                                               "allowed: all_servers, fewest_servers")


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
    sz = LayerSizes(expert_bytes=b, moe_decoder_layers=(0, 1, 2, 3), layer_dense_bytes=(2500,) * 4, head_bytes=0)
    spec = equal_spec(b, replicate_dense=False)
    calls = [Call(1, 1, 1)] * held_out.num_tokens
    rows, placed = compare_placements(stats, sz, spec, held_out.experts, calls, HIDDEN, replicate=True)
    assert [r["method"] for r in rows] == [
        "contiguous", "contiguous+replicas", "round_robin", "round_robin+replicas",
        "greedy_balanced", "greedy_balanced+replicas", "affinity", "affinity+replicas", "all_servers",
        "fewest_servers",
    ]
    ours = next(r for r in rows if r["method"] == "affinity")
    best_expert = min(r["bytes_per_token"] for r in rows if r["method"] in ("contiguous", "round_robin",
                                                                            "greedy_balanced"))
    assert ours["bytes_per_token"] <= 0.65 * best_expert
    pipe = next(r for r in rows if r["method"] == "all_servers")
    assert pipe["hops_per_call"] == 4 and pipe["layer_balance"] == 4.0  # each layer on one server
    assert max(r["reduction"] for r in rows if r["method"] in ("contiguous", "round_robin", "greedy_balanced",
                                                               "all_servers")) == 0
    assert placed["affinity+replicas"].mode == "expert" and placed["fewest_servers"].mode == "pipeline"


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
