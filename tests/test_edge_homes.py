"""Several homes (expert model): sequences admitted at two servers that both hold the dense weights give the
single-process model's outputs (float32, 1e-5; the same greedy tokens), in the simulation and in real gloo processes
where the homes compute at the same time (a rank that is home and expert server at once answers the other home while
it computes its own rows); the real run counts exactly what the simulation counts, per home and in total, and a
replay of each home's calls predicts that home's counts. Token policies and torchrun work with several homes."""
from __future__ import annotations

import pytest
import torch
from edge_bundles import IDS, MASK, checkpoint, expert_bundles, run_calls

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.tokens import build_pipeline
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
        per_home = {h: c.counts() for h, c in d.home_counters().items()}
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
    # replay: each home's recorded routing with that home's calls, per home and all together
    placement = Placement.load(out / "placement.json")
    for h, e, _, cs in traces:
        assert replay(placement, e, [Call(*c, home=h) for c in cs], 64, 4).counts() == per_home[h]
    experts = torch.cat([e for _, e, _, _ in traces])
    replay_calls = [Call(*c, home=h) for h, _, _, cs in traces for c in cs]
    predicted = replay(placement, experts, replay_calls, 64, 4)
    assert predicted.counts() == counts


def _sim_and_real(out, **kw):
    """(outputs and counts, per home too) of the same calls simulated and in real processes (3 ranks: homes 0 and 1
    computing at the same time, server 2)."""
    runs = []
    for simulate in (True, False):
        with deploy(out, simulate=simulate, homes=(0, 1), timeout=60, **kw) as d:
            logits, tokens, counts = run_calls(d)
            runs.append((logits, tokens, counts, {h: c.counts() for h, c in d.home_counters().items()}))
    return runs


@pytest.mark.slow
def test_two_homes_in_processes_equal_the_simulation(built):
    out, ref_logits, ref_tokens = built
    sim, (logits, tokens, counts, per_home) = _sim_and_real(out)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counts == sim[2] and per_home == sim[3]
    sent = torch.tensor(counts["messages"]).sum(0)  # [src, dst]
    assert sent[0, 1] > 0 and sent[1, 0] > 0  # each home answered the other's requests


@pytest.mark.slow
@pytest.mark.usefixtures("rank_threads")
def test_two_homes_with_token_policies_in_processes_equal_the_simulation(built):
    """Pruning, fusion and int8 payloads at both homes: the real run's outputs and every count (token-policy counts
    included, per home and in total) equal the simulation's; each home planned its own rows."""
    out = built[0]
    spec = "int8+protect:first=2+prune_layer:threshold=0.5+fuse:threshold=0.3"
    sim, real = _sim_and_real(out, tokens=spec)
    assert torch.equal(real[0], sim[0]) and torch.equal(real[1], sim[1])
    assert real[2] == sim[2] and real[3] == sim[3]
    for h in (0, 1):
        tok = real[3][h]["token_policies"]
        assert tok["spec"] == build_pipeline(spec).spec and tok["bytes_by_precision"]["int8"] > 0
        assert tok["total"]["pruned_pairs"] > 0


def test_two_homes_with_token_policies_simulated(built):
    """Zero thresholds at both homes change nothing (outputs and lossless counts); a lossy policy counts at both
    homes, and the total is their sum."""
    out, ref_logits, ref_tokens = built
    with deploy(out, simulate=True, homes=(0, 1)) as d:
        lossless = run_calls(d)[2]
    zero = "protect:first=2+prune_server:threshold=0+skip_weakest:threshold=0+fuse:threshold=1.01"
    with deploy(out, simulate=True, homes=(0, 1), tokens=zero) as d:
        logits, tokens, counts = run_calls(d)
    assert (logits - ref_logits).abs().max() <= 1e-5 and torch.equal(tokens, ref_tokens)
    assert {k: v for k, v in counts.items() if k != "token_policies"} == lossless
    assert counts["token_policies"]["total"]["pruned_pairs"] == 0
    with deploy(out, simulate=True, homes=(0, 1), tokens="int8+prune_layer:threshold=0.5") as d:
        _, _, counts = run_calls(d)
        per_home = {h: c.token_counts()["total"] for h, c in d.home_counters().items()}
        d.set_tokens(None)  # off at every home: the lossless outputs again
        again = run_calls(d)
    assert (again[0] - ref_logits).abs().max() <= 1e-5 and torch.equal(again[1], ref_tokens)
    assert all(t["pruned_pairs"] > 0 for t in per_home.values())
    assert counts["token_policies"]["total"]["pruned_pairs"] == sum(t["pruned_pairs"] for t in per_home.values())


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
    with pytest.raises(MoecompressError, match="unknown token policy"):
        deploy(out, simulate=False, homes=(0, 1), tokens="int9")  # refused before any process starts


def test_several_homes_refuse_nccl_before_starting(built, monkeypatch):
    """NCCL has no receive from any rank and no tags: several homes say so before any process starts."""
    from moecompress.runtime.edge import transport

    monkeypatch.setattr(transport, "exchange_device", lambda rank: torch.device("cuda", rank))
    with pytest.raises(MoecompressError, match="several homes need gloo"):
        deploy(built[0], simulate=False, homes=(0, 1))


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


@pytest.mark.slow
def test_run_under_torchrun_with_two_homes(built, capsys):
    """torchrun (c10d rendezvous on port 0: none fixed), 3 ranks, `--homes 0,1` on every rank: the front hands home 1
    its prompts, both compute at once; the continuations equal the simulation's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from moecompress.cli import main

    out = str(built[0])
    prompts = sum((["--prompt", p] for p in ("ab", "cde", "f")), [])
    assert main(["generate", "--bundles", out, "--simulate", "--homes", "0,1", "--max-new-tokens", "3"] + prompts) == 0
    want = [json.loads(line)["continuation"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc-per-node", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "moecompress.cli", "run", "--bundles",
           out, "--homes", "0,1", "--max-new-tokens", "3", "--timeout", "60"] + prompts
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = [json.loads(line)["continuation"] for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(want) == 3 and got == want
