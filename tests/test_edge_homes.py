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
