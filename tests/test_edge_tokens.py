"""Token policies in the edge runtime (expert model): every policy off is the lossless run exactly; zero thresholds
change nothing; fused rows come back to every member; protected tokens are never pruned; payloads at int8 / fp8
keep their per-row scales both ways; simulation and real gloo processes count the same; bad selections are clear
errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from edge_bundles import IDS, MASK, checkpoint, expert_bundles, run_calls

from dataclasses import dataclass
from typing import ClassVar

from moecompress.cli import main as cli_main
from moecompress.errors import MoecompressError
from moecompress.execution.tokens import POLICIES, register_policy
from moecompress.execution.tokens.plan import with_pairs
from moecompress.recipe import recipe_from_dict
from moecompress.execution.counters import HEADER_BYTES, Counters
from moecompress.execution.routing import ExpertTables
from moecompress.execution.tokens import LayerContext, build_pipeline, plan_traffic
from moecompress.execution.tokens.exchange import reply_layout, request_bytes, row_values, server_batches
from moecompress.runtime.edge import deploy, wire
from moecompress.runtime.edge.dispatcher import DispatchedExperts, TokenSettings
from moecompress.runtime.edge.serve import PlanServer
from moecompress.runtime.edge.transport import InProcess

T, K, E, N, H = 24, 4, 8, 3, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ck, logits, tokens = checkpoint(tmp_path_factory)  # shared with other modules: bundles go to a folder of ours
    out = tmp_path_factory.mktemp("tokens")
    for n in (2, 3):
        expert_bundles(ck, out / f"out{n}", n)
    with deploy(out / "out3", simulate=True, verify=False) as d:
        lossless = run_calls(d)
    return out, logits, tokens, lossless


def test_every_policy_off_is_the_lossless_run(built):
    tmp, ref_logits, ref_tokens, (logits, tokens, counts) = built
    assert (logits - ref_logits).abs().max() <= 1e-5 and torch.equal(tokens, ref_tokens)
    assert "token_policies" not in counts
    for off in ("", [], {}):
        assert not build_pipeline(off).policies
    with deploy(tmp / "out3", simulate=True, tokens="none", verify=False) as d:
        assert d.tokens is None
        got = run_calls(d)
    assert torch.equal(got[0], logits) and torch.equal(got[1], tokens) and got[2] == counts


ZERO = ("protect:first=2+prune_server:threshold=0+prune_layer:threshold=0,relative=true+skip_weakest:threshold=0"
        "+substitute:threshold=0,scope=layer+fuse:threshold=1.01")


def test_zero_thresholds_change_nothing(built):
    """Every pruning rule at threshold 0 and fusion above cosine 1, all at once (each alone: test_tokens_policies):
    the plan path of the dispatcher gives the lossless outputs and counts exactly."""
    tmp, _, _, (logits, tokens, counts) = built
    L = len(counts["pairs"])
    with deploy(tmp / "out3", simulate=True, tokens=ZERO, similarity=torch.eye(E)[None].repeat(L, 1, 1),
                verify=False) as d:
        got_logits, got_tokens, got = run_calls(d)
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    tok = got.pop("token_policies")
    assert got == counts  # the same messages, bytes, hops and pairs as the lossless run
    assert tok["total"]["pruned_pairs"] == tok["total"]["fused_rows"] == tok["total"]["substituted_pairs"] == 0
    assert tok["total"]["remote_tokens"] == tok["total"]["lossless_remote_tokens"] > 0


@dataclass(frozen=True)
class AllLocal:
    """A user policy: every unprotected token with an expert on its home drops its remote pairs."""

    name: ClassVar[str] = "all_local"
    stage: ClassVar[str] = "prune"
    keep: int = 0

    def __call__(self, ctx, plan, state):
        live = plan.servers >= 0
        remote = live & (plan.servers != ctx.home[:, None])
        drop = remote & (live & ~remote).any(-1, keepdim=True) & ~plan.protected[:, None]
        return with_pairs(ctx, plan, plan.servers, plan.experts, drop, self.name)


def test_protected_tokens_are_never_pruned_and_user_policies_are_found_by_name(built):
    """Every prompt token is protected (first=10 covers the 10-token prompts): the forward is the lossless one
    exactly although the user's policy drops every remote pair it may; the decode steps (positions >= 10) are."""
    tmp, _, _, (logits, _, counts) = built
    register_policy(AllLocal)
    try:
        d = deploy(tmp / "out3", simulate=True, tokens="protect:first=10+all_local:keep=1", verify=False)
    finally:
        POLICIES.pop("all_local")
    with d:
        assert torch.equal(d(IDS, MASK), logits)
        assert d.counters.token_counts()["total"]["pruned_pairs"] == 0
        d.generate(IDS, MASK, max_new_tokens=3, stop_at_eos=False)
        total = d.counters.token_counts()["total"]
    assert total["pruned_pairs"] > 0 and total["remote_tokens"] < total["lossless_remote_tokens"]


class ToyServer:
    """compute(layer, x, ids, weights) = sum_j w_j tanh(W[ids_j] x), the sentinel id E contributing nothing."""

    def __init__(self, w, home=0):
        self.w, self.home = w, home

    def handle(self, head, payload):  # OP_EXPERT, as rank_model.ExpertServer
        _, layer, rows, top_k, code, hidden_size = head[:6]
        x, ids, weights = wire.decode_request(payload, rows, hidden_size, top_k, wire.dtype_of(code))
        return [(self.home, None, wire.as_bytes(self.compute(layer, x, ids, weights)))]

    def compute(self, layer, x, ids, weights):
        w = torch.cat([self.w, torch.zeros(1, H, H)])
        y = torch.tanh(torch.einsum("rkoh,rh->rko", w[ids], x.float()))
        return (weights.float()[:, :, None] * y * (ids < E)[:, :, None]).sum(1).to(x.dtype)


class ToyLocal(torch.nn.Module):
    def __init__(self, server):
        super().__init__()
        self.server = server

    def forward(self, x, ids, weights):
        return self.server.compute(0, x, ids, weights)


def toy_layer(spec):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(E, H, H, generator=g) / H ** 0.5
    holds = torch.zeros(1, E, N, dtype=torch.bool)
    holds[0, torch.arange(E), torch.arange(E) % N] = True
    tables = ExpertTables(holds=holds, primary=(torch.arange(E) % N)[None])
    base = torch.randn(4, H, generator=g)
    hidden = base[torch.arange(T) % 4] + 0.05 * torch.randn(T, H, generator=g)  # near-duplicates: fusion merges
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    settings = TokenSettings(build_pipeline(spec), renormalize=True)
    counters = Counters(N, 1)
    transport = InProcess(0, {n: PlanServer(ToyServer(w), E) for n in (1, 2)}, N)
    layer = DispatchedExperts(0, ToyLocal(ToyServer(w)), tables, 0, transport, counters, tokens=settings)
    ctx = LayerContext(hidden=hidden, topk_ids=ids, topk_weights=weights, holds=holds[0], primary=tables.primary[0],
                       home=torch.zeros(T, dtype=torch.long), layer=0, sequence=torch.zeros(T, dtype=torch.long),
                       position=torch.arange(T), renormalize=True)
    return layer, ctx, w, counters


def expected_output(ctx, plan, w, precision_rows=lambda x: x):
    """Each pair computed on its own hidden state (home) or on its row as the server received it."""
    out = torch.zeros(T, H)
    rows = {}
    for b in server_batches(ctx, plan):
        x = precision_rows(row_values(ctx.hidden, b))
        for m in range(b.num_members):
            rows[(int(b.tokens[m]), b.server)] = x[b.rows[m]]
    for t in range(T):
        for j in range(K):
            n = int(plan.servers[t, j])
            if n < 0:
                continue
            x = ctx.hidden[t] if n == 0 else rows[(t, n)]
            out[t] += plan.weights[t, j] * torch.tanh(w[plan.experts[t, j]] @ x)
    return out


def test_fused_rows_scatter_back_to_every_member():
    layer, ctx, w, counters = toy_layer("fuse:threshold=0.9")
    plan = layer.tokens.pipeline.plan(ctx)
    batches = server_batches(ctx, plan)
    assert any(b.fused for b in batches)
    modes = [reply_layout(b.rows, b.sizes, b.ids, E) for b in batches]
    assert any(m.expert_rows.numel() for m in modes) and any(m.per_member.any() for m in modes)  # both replies
    with torch.no_grad():
        out = layer(ctx.hidden, ctx.topk_ids, ctx.topk_weights)
    torch.testing.assert_close(out, expected_output(ctx, plan, w), rtol=0, atol=1e-5)
    tr = plan_traffic(ctx, plan)
    assert tr.fused_rows == counters.token["fused_rows"][0] > 0
    assert tr.bytes == int(counters.bytes.sum()) and tr.messages == int(counters.messages.sum())


@pytest.mark.parametrize("precision", ["int8", "fp8", "bf16"])
def test_payload_precisions_both_ways(precision):
    if precision == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    layer, ctx, w, counters = toy_layer(f"{precision}+fuse:threshold=0.9")
    plan = layer.tokens.pipeline.plan(ctx)
    with torch.no_grad():
        out = layer(ctx.hidden, ctx.topk_ids, ctx.topk_weights)
    exact = expected_output(ctx, plan, w)
    err = (out - exact).abs().max()
    assert 0 < err <= {"int8": 0.05, "fp8": 0.2, "bf16": 0.02}[precision]
    tr = plan_traffic(ctx, plan)
    assert tr.bytes == int(counters.bytes.sum()) == sum(counters.bytes_by_precision.values())
    assert set(counters.bytes_by_precision) == {precision}
    b = next(b for b in server_batches(ctx, plan) if b.fused)
    payload = wire.encode_plan_request(row_values(ctx.hidden, b), b.sizes, True, b.ids, b.weights, precision)
    assert payload.numel() + HEADER_BYTES == request_bytes(b, precision, H, 4)
    head = wire.plan_header(0, b.num_rows, b.num_members, K, torch.float32, H, precision, precision).tolist()
    assert wire.payload_bytes(head) == payload.numel()
    rows, sizes, ids, weights, ret = wire.decode_plan_request(payload, head)
    assert torch.equal(sizes, b.sizes) and torch.equal(ids, b.ids) and ret == precision


@pytest.mark.slow
def test_simulation_and_processes_count_the_same(built):
    """Real gloo processes (2 servers) with pruning, fusion and int8 payloads: the outputs and every counter,
    token-policy counts included, equal the simulation's."""
    tmp = built[0]
    spec = "int8+protect:first=2+prune_layer:threshold=0.5+fuse:threshold=0.3"
    with deploy(tmp / "out2", simulate=True, tokens=spec) as d:
        sim = run_calls(d)
    with deploy(tmp / "out2", simulate=False, tokens=spec, timeout=60) as d:
        real = run_calls(d)
        table = d.counters.table()
    assert torch.equal(real[0], sim[0]) and torch.equal(real[1], sim[1]) and real[2] == sim[2]
    tok = real[2]["token_policies"]
    assert tok["total"]["fused_rows"] > 0 and tok["total"]["pruned_pairs"] > 0 and tok["bytes_by_precision"]["int8"]
    assert "rows fused" in table and "int8" in table


def test_bad_selections_are_clear_errors(built, tmp_path):
    out = built[0] / "out3"
    with pytest.raises(MoecompressError, match="unknown token policy 'prune_servr'; allowed: .*prune_server.*int8"):
        deploy(out, tokens="prune_servr:threshold=0.2")
    with pytest.raises(MoecompressError, match="unknown knob.*allowed: relative, threshold"):
        deploy(out, tokens="prune_server:limit=0.2")
    with pytest.raises(MoecompressError, match="allowed: native, bf16, int8"):
        deploy(out, tokens="precision:dispatch=int4")
    with pytest.raises(MoecompressError, match="substitute policy needs an expert similarity"):
        deploy(out, simulate=True, tokens="substitute:threshold=0.2")
    bad = tmp_path / "r.yaml"
    bad.write_text("model: m\noutput: o\n")
    with pytest.raises(MoecompressError, match="no top-level `tokens` section"):
        deploy(out, tokens=str(bad))


def test_recipe_section_and_command_line(built, tmp_path, capsys):
    r = recipe_from_dict({"model": "m", "output": "o", "tokens": [{"name": "prune_server", "threshold": 0.2}, "int8"]})
    assert build_pipeline(r.tokens).spec == "prune_server:threshold=0.2,relative=false+precision:dispatch=int8,return=int8"
    with pytest.raises(MoecompressError, match="recipe key tokens: unknown knob.*allowed: relative, threshold"):
        recipe_from_dict({"model": "m", "output": "o", "tokens": {"prune_server": {"limit": 1}}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\noutput: o\ntokens:\n  fuse: {threshold: 0.9}\n  int8: {}\n")
    from moecompress.runtime.edge.tokens import resolve_pipeline

    assert resolve_pipeline(str(recipe)).spec == "fuse:threshold=0.9,across=true+precision:dispatch=int8,return=int8"
    rc = cli_main(["generate", "--bundles", str(built[0] / "out3"), "--simulate", "--prompt", "ab",
                   "--tokens", "fuse:treshold=0.9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown knob(s) treshold for token policy 'fuse'; allowed: across" in err[0]


def test_decode_steps_without_a_mask_are_at_their_cache_position(built):
    """generate drops an all-ones attention mask and passes position ids: a decode step's token is at its cache
    length (10, 11, ...), not at 0: `protect:first=10` protects the 10-token prompt only, the decode steps are
    pruned (they were all protected once)."""
    tmp = built[0]
    settings = TokenSettings(build_pipeline("native"), renormalize=True)
    settings.set_call(IDS[:1, :1], None, torch.tensor([[10]]))
    assert settings.layout(1)[1].tolist() == [10]
    settings.set_call(IDS[:1], None)  # a forward without a mask: positions 0..S-1
    assert settings.layout(10)[1].tolist() == list(range(10))
    register_policy(AllLocal)
    try:
        d = deploy(tmp / "out3", simulate=True, tokens="protect:first=10+all_local", verify=False)
    finally:
        POLICIES.pop("all_local")
    with d:
        d.generate(IDS[:1], max_new_tokens=3, stop_at_eos=False)  # no mask: generate passes none
        total = d.counters.token_counts()["total"]
    assert total["pruned_pairs"] > 0 and total["remote_tokens"] < total["lossless_remote_tokens"]


def test_substitute_reads_the_similarity_the_bundles_carry(built):
    """Bundles written with a similarity (as `moecompress shard` does: calibration co-activation) let `substitute`
    run without one passed in, exactly as with that tensor passed in; a different tensor substitutes differently."""
    import json

    from moecompress.artifacts.placement import Placement
    from moecompress.format.files import PLACEMENT_FILE
    from moecompress.runtime.edge.tokens import SIMILARITY_FILE
    from moecompress.shard.bundles import write_bundles

    tmp = built[0]
    doc = json.loads((tmp / "out3" / PLACEMENT_FILE).read_text())
    placement = Placement.from_json(doc)
    L = placement.num_layers
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(L, E, E, generator=g)
    out = tmp / "out3sim"
    write_bundles(doc["checkpoint"], placement, out, overwrite=True, similarity=sim)
    assert all((out / f"server-{n}" / SIMILARITY_FILE).exists() for n in range(placement.num_servers))
    spec = "substitute:threshold=0.6,scope=layer"
    with deploy(out, simulate=True, tokens=spec) as d:  # verify=True: the file is in the manifests
        shipped = run_calls(d)
    with deploy(tmp / "out3", simulate=True, tokens=spec, similarity=sim, verify=False) as d:
        passed = run_calls(d)
    with deploy(out, simulate=True, tokens=spec, similarity=torch.rand(L, E, E, generator=g), verify=False) as d:
        other = run_calls(d)
    assert torch.equal(shipped[0], passed[0]) and torch.equal(shipped[1], passed[1])
    assert shipped[2]["token_policies"]["total"]["substituted_pairs"] > 0
    assert shipped[2] == passed[2]
    assert not torch.equal(other[0], shipped[0])


def test_home_copies_make_layers_local_through_the_runtime(built, tmp_path_factory):
    """Copies of every remote expert (here from the deployment's own checkpoint, so that the outputs must equal the
    lossless run's) make every token local under `localize:copies=true`: no round trip, every remote pair computed
    with a copy and counted; the copies hold exactly those experts' stored bytes; copying an expert the home holds
    is refused."""
    from moecompress.runtime.edge.tokens_copies import attach_home_copies
    from moecompress.shard.command import checkpoint_sizes

    tmp, _, _, (logits, tokens, counts) = built
    ck = checkpoint(tmp_path_factory)[0]
    with deploy(tmp / "out3", simulate=True, verify=False) as d:
        home, assignment = d.info.home, d.info.assignment
        remote = [[e for e, servers in enumerate(layer) if home not in servers] for layer in assignment]
        with pytest.raises(MoecompressError, match="holds expert"):
            attach_home_copies(d, ck, [[e for e in range(len(layer))] for layer in assignment])
        with pytest.raises(MoecompressError, match="home-copies"):  # neither attached nor bundled
            d.set_tokens("localize:threshold=1e-6,copies=true")
        copy_bytes = attach_home_copies(d, ck, remote)
        d.set_tokens("localize:threshold=1e-6,copies=true")
        expert_bytes, _ = checkpoint_sizes(ck)
        assert copy_bytes == sum(int(expert_bytes[l, e]) for l, ids in enumerate(remote) for e in ids)
        got_logits, got_tokens, got = run_calls(d)
    assert (got_logits - logits).abs().max() <= 1e-5 and torch.equal(got_tokens, tokens)
    hops = lambda c: int(np.asarray(c["hops"]).sum())  # noqa: E731
    assert hops(counts) > 0 and hops(got) == 0 and int(np.asarray(got["bytes"]).sum()) == 0
    tok = got["token_policies"]["total"]
    assert tok["remote_tokens"] == 0 and tok["copy_pairs"] > 0
    assert tok["saved_hops"] == hops(counts)


@pytest.mark.slow
def test_home_copies_count_the_same_in_processes_and_the_simulation(built, tmp_path_factory):
    """Copies of every other remote expert, localize with copies and a copy threshold (some tokens go local on
    copies, others still make round trips): real gloo processes give the simulation's outputs and counts."""
    from moecompress.runtime.edge.tokens_copies import attach_home_copies

    tmp = built[0]
    ck = checkpoint(tmp_path_factory)[0]
    spec = "int8+localize:threshold=0.2,copies=true,copy_threshold=0.6"
    runs = []
    for simulate in (True, False):
        with deploy(tmp / "out2", simulate=simulate, timeout=60) as d:
            home = d.info.home
            copies = [[e for e, servers in enumerate(layer) if home not in servers][::2] for layer in d.info.assignment]
            attach_home_copies(d, ck, copies)
            d.set_tokens(spec)
            runs.append(run_calls(d))
    (sim_logits, sim_tokens, sim), (real_logits, real_tokens, real) = runs
    assert torch.equal(real_logits, sim_logits) and torch.equal(real_tokens, sim_tokens) and real == sim
    tok = real["token_policies"]["total"]
    assert tok["copy_pairs"] > 0 and tok["remote_tokens"] > 0 and tok["saved_hops"] > 0
