"""Several homes (expert model): sequences admitted at two servers that both hold the dense weights give the
single-process model's outputs (float32, 1e-5; the same greedy tokens), in the simulation and in real gloo processes
(a rank that is home and expert server at once); the real run counts exactly what the simulation counts, and a replay
with each call's home predicts those counts."""
from __future__ import annotations

import pytest
import torch
from edge_bundles import IDS, MASK, checkpoint, expert_bundles, run_calls

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.runtime.edge import deploy
from moecompress.runtime.edge.homes import split_rows


def _bundles(ck, out, servers: int = 3, dense=(0, 1)):
    """Experts round-robin with a replica of every third expert on the next server; dense weights on `dense`."""
    return expert_bundles(ck, out, servers, dense)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ck, logits, tokens = checkpoint(tmp_path_factory)
    return _bundles(ck, ck.parent / "homes3"), logits, tokens


def test_rows_go_round_robin_over_the_homes():
    rows = split_rows(5, (1, 0))
    assert rows[1].tolist() == [0, 2, 4] and rows[0].tolist() == [1, 3]
    assert list(split_rows(1, (0, 1))) == [0]  # a home without a row is left out


def test_two_homes_simulated_equal_the_model_and_the_replay(built):
    from moecompress.execution.replay import Call, replay

    out, ref_logits, ref_tokens = built
    with deploy(out, simulate=True, homes=(0, 1), record=True) as d:
        logits, tokens, counts = run_calls(d)
        traces = d.trace()
        calls = list(d.calls)
        texts = d.generate_text(["ab", "cde", "f"], max_new_tokens=2, stop_at_eos=False)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    sent = torch.tensor(counts["messages"]).sum(0)  # [src, dst]
    assert sent[0].sum() > 0 and sent[1].sum() > 0  # both homes sent requests
    assert sent[0, 1] > 0 and sent[1, 0] > 0  # each home served the other's tokens
    assert sent[2, 0] > 0 and sent[2, 1] > 0  # the pure server answered both homes
    assert {h for h, *_ in calls} == {0, 1}
    # replay: each home's recorded routing with that home's calls
    experts = torch.cat([e for _, e, _, _ in traces])
    replay_calls = [Call(*c, home=h) for h, _, _, cs in traces for c in cs]
    predicted = replay(Placement.load(out / "placement.json"), experts, replay_calls, 64, 4)
    assert predicted.counts() == counts


@pytest.mark.slow
def test_two_homes_in_processes_equal_the_simulation(built):
    out, ref_logits, ref_tokens = built
    with deploy(out, simulate=True, homes=(0, 1)) as d:
        _, _, sim_counts = run_calls(d)
    with deploy(out, simulate=False, homes=(0, 1), timeout=60) as d:
        logits, tokens, counts = run_calls(d)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counts == sim_counts


def _stores(d) -> dict:
    """server -> its ExpertStore in a simulated several-homes deployment (each home's and the pure servers')."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    out = {}
    for h, member in d.members.items():
        for m in member.model.modules() if hasattr(member, "model") else ():  # a RemoteHome: in its process
            if isinstance(m, DispatchedExperts) and m.local is not None and m.local.expert_store is not None:
                out[h] = m.local.expert_store.store
    for n, handler in getattr(d.front.transport, "handlers", {}).items():  # simulated servers
        for m in getattr(getattr(handler, "inner", None), "experts", {}).values():
            if m.expert_store is not None:
                out[n] = m.expert_store.store
    return out


def _budget(out) -> int:
    """A budget no server's experts fit in, above every store's smallest workable one."""
    with deploy(out, simulate=True, homes=(0, 1), expert_budget=1 << 40) as d:
        sizes = {n: (sum(s.cache.layout.nbytes.values()), s.cache.min_budget) for n, s in _stores(d).items()}
    assert set(sizes) == {0, 1, 2}  # both homes and the pure server
    budget = max(max(m for _, m in sizes.values()), min(t for t, _ in sizes.values()) // 3)
    assert budget < min(t for t, _ in sizes.values())
    return budget


def test_two_homes_with_an_expert_budget_equal_the_resident_run(built):
    out, ref_logits, ref_tokens = built
    budget = _budget(out)
    with deploy(out, simulate=True, homes=(0, 1)) as d:
        _, _, resident = run_calls(d)
    with deploy(out, simulate=True, homes=(0, 1), expert_budget=budget) as d:
        logits, tokens, counts = run_calls(d)
        stores = {n: s.counters() for n, s in _stores(d).items()}
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counts == resident  # the store changes where weights come from, not what is sent
    for n, c in stores.items():
        assert c["misses"] > 0 and c["peak_bytes"] <= budget, (n, c)


@pytest.mark.slow
def test_two_homes_in_processes_with_an_expert_budget(built):
    out, ref_logits, ref_tokens = built
    budget = _budget(out)
    with deploy(out, simulate=True, homes=(0, 1)) as d:
        _, _, resident = run_calls(d)
    with deploy(out, simulate=False, homes=(0, 1), timeout=60, expert_budget=budget) as d:
        logits, tokens, counts = run_calls(d)
        home = _stores(d)[0].counters()
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counts == resident
    assert home["misses"] > 0 and home["peak_bytes"] <= budget


def test_a_server_without_dense_weights_cannot_be_a_home(built):
    out, _, _ = built
    with pytest.raises(MoecompressError, match="server 2 cannot be a home"):
        deploy(out, simulate=True, homes=(0, 2))
    with pytest.raises(MoecompressError, match="distinct servers"):
        deploy(out, simulate=True, homes=(0, 5))
    with pytest.raises(MoecompressError, match="token policies with several homes"):
        deploy(out, simulate=True, homes=(0, 1), tokens="int8")


@pytest.mark.slow
def test_a_dead_home_is_named_and_the_deployment_stops(built):
    out, _, _ = built
    d = deploy(out, simulate=False, homes=(0, 1), timeout=10)
    launched = d.front.servers
    launched.procs[1].kill()
    launched.procs[1].wait()
    with pytest.raises(MoecompressError, match="server 1"):
        d(IDS, MASK)
    d.close()
    assert all(p.poll() is not None for p in launched.procs.values())  # every server process is gone
    assert not launched.tmp.exists()  # the rendezvous directory is removed
