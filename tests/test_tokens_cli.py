"""Low-bit home copies from the command line: `moecompress shard --home-copies BITS` writes a copies bundle into
every home's bundle (only the chosen experts' low-bit tensors, pinned by manifests and placement.json); the commands
that run a deployment load it when the policy asks for copies (`localize:copies=true`) and give exactly what the
Python API (attach_home_copies) gives: outputs and counters; every home uses its own copies; bad input is a clear
error."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from edge_bundles import IDS, MASK, char_tokenizer, run_calls
from helpers import quantize_tiny
from safetensors import safe_open

from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.placement import Placement
from moecompress.calibrate.dataset import CalibrationData
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.cli import main as cli_main
from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.bundle_set import verify_bundles
from moecompress.format.files import PLACEMENT_FILE
from moecompress.format.spec import group_prefix
from moecompress.quantize.stage import QuantizeOptions, quantize_copies
from moecompress.runtime.edge import deploy
from moecompress.runtime.edge.tokens_copies import (HOME_COPIES_DIR, HOME_COPIES_FILE, attach_home_copies,
                                                     attach_home_copy_sources)
from moecompress.shard.command import checkpoint_sizes
from moecompress.shard.home_copies import server_expert_bytes

SPEC = "int8+localize:threshold=0.2,copies=true,copy_threshold=0.7"
BUDGET = 0.6  # x the mean server's expert bytes: some remote experts copied, not all


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny qwen3_moe: `ck` (mixed bits, with 4-bit RTN low-bit copies), `low4` (every expert at 4 bits, RTN), `hi8`
    (at 8 bits, RTN), the calibration stats; `out`: `moecompress shard ... --home-copies 4 --home-copies-from low4` on
    3 servers (dense weights on each: three homes), `own`: the same from ck's own copies, `mixed`: mixed-bit copies
    (the hottest from hi8 on half the budget, the rest from low4), `plain`: without copies."""
    from conftest import _build

    tmp = tmp_path_factory.mktemp("tokens_cli")
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    plan4 = dataclasses.replace(plan, copy_bits=4)
    copies = quantize_copies(model, layout, plan4, None, QuantizeOptions(method="rtn"), progress=False)
    export_checkpoint(model, layout, plan4, quantized, tmp / "ck", tokenizer=char_tokenizer(), dtype=torch.float32,
                      copies=copies)
    uniform = BitPlan.uniform(layout, 4, group_size=plan.group_size)
    _, _, q4 = quantize_tiny(model, plan=uniform)
    export_checkpoint(model, layout, uniform, q4, tmp / "low4", dtype=torch.float32)
    uniform8 = BitPlan.uniform(layout, 8, group_size=plan.group_size)
    _, _, q8 = quantize_tiny(model, plan=uniform8)
    export_checkpoint(model, layout, uniform8, q8, tmp / "hi8", dtype=torch.float32)
    ids = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(input_ids=ids, attention_mask=torch.ones_like(ids))
    calibrate(model, None, data, CalibrationOptions(samples=16, seq_len=32, hessians=False, progress=False)
              ).save(tmp / "stats")
    expert_bytes, dense_bytes = checkpoint_sizes(tmp / "ck")
    servers = f"3x{int(dense_bytes + expert_bytes.sum() * 0.5)}B"
    shard = ["shard", "--model", str(tmp / "ck"), "--stats", str(tmp / "stats"), "--servers", servers, "--mode",
             "expert", "--method", "round_robin", "--no-replicate"]
    assert cli_main(shard + ["--out", str(tmp / "plain")]) == 0
    copies4 = ["--home-copies", "4", "--home-copies-budget", str(BUDGET)]
    assert cli_main(shard + ["--out", str(tmp / "out"), *copies4, "--home-copies-from", str(tmp / "low4")]) == 0
    assert cli_main(shard + ["--out", str(tmp / "own"), *copies4]) == 0
    assert cli_main(shard + ["--out", str(tmp / "mixed"), *copies4, "--home-copies-from", str(tmp / "low4"),
                             "--home-copies-high", "8", "--home-copies-high-from", str(tmp / "hi8")]) == 0
    return tmp


def description(out, server):
    return json.loads((out / f"server-{server}" / HOME_COPIES_DIR / HOME_COPIES_FILE).read_text())


def test_every_home_gets_a_verified_bundle_of_remote_copies_within_the_budget(made):
    out = made / "out"
    doc = verify_bundles(out)  # every file, the copies bundles' too, against placement.json and the manifests
    assert cli_main(["verify", str(out)]) == 0
    assert doc["dense_servers"] == [0, 1, 2]
    placement_budget = BUDGET * server_expert_bytes(Placement.from_json(doc)).mean()
    low4_bytes, _ = checkpoint_sizes(made / "low4")
    for server in range(3):
        desc = description(out, server)
        assert desc["home"] == server and desc["bits"] == 4
        assert any(desc["experts"]) and not all(
            len(ids) == sum(server not in s for s in layer) for ids, layer in zip(desc["experts"], doc["assignment"]))
        for layer, ids in enumerate(desc["experts"]):
            assert all(server not in doc["assignment"][layer][e] for e in ids)  # remote experts only
        assert desc["bytes"] == sum(int(low4_bytes[layer, e]) for layer, ids in enumerate(desc["experts"]) for e in ids)
        assert desc["bytes"] <= placement_budget
        listed = [f for f in doc["files"][str(server)] if f"/{HOME_COPIES_DIR}/" in f]
        assert sorted(f.rsplit("/", 1)[1] for f in listed) == ["config.json", HOME_COPIES_FILE, "model.safetensors",
                                                                 "moecompress.json"]
    # the tensors are the source's rows, never re-quantized; the checkpoint's own 4-bit copies are the same numbers
    desc = description(out, 0)
    layer = next(i for i, ids in enumerate(desc["experts"]) if ids)
    path = doc["experts_paths"][layer]
    key = f"{group_prefix(path, 'down', 4)}.qweight"
    with safe_open(str(out / "server-0" / HOME_COPIES_DIR / "model.safetensors"), "pt") as f, \
            safe_open(str(made / "low4" / "model.safetensors"), "pt") as g, \
            safe_open(str(made / "own" / "server-0" / HOME_COPIES_DIR / "model.safetensors"), "pt") as h:
        assert torch.equal(f.get_tensor(key), g.get_tensor(key)[desc["experts"][layer]])
        assert torch.equal(f.get_tensor(key), h.get_tensor(key))
    assert description(made / "own", 0) == desc



def cli_generate(out, tmp_path, capsys):
    """`moecompress generate --bundles out --simulate --tokens SPEC` of two prompts: (continuations, counts)."""
    counters = tmp_path / "c.json"
    rc = cli_main(["generate", "--bundles", str(out), "--simulate", "--prompt", "hello ed", "--prompt", "ge",
                   "--max-new-tokens", "4", "--tokens", SPEC, "--counters-out", str(counters)])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    return [x["continuation"] for x in lines], Counters.from_json(json.loads(counters.read_text())).counts()


def test_a_run_loads_the_bundle_and_equals_the_python_api(made, tmp_path, capsys):
    """generate --bundles (CLI) == deploy(tokens=...) on the bundle == deploy + attach_home_copies(low4) (Python
    API): the same continuations, the same logits and tokens, the same counts; copies are used."""
    out = made / "out"
    experts = description(out, 0)["experts"]
    with deploy(out, simulate=True, tokens=SPEC) as d:
        text = d.generate_text(["hello ed", "ge"], max_new_tokens=4)
        text_counts = d.reset_counters().counts()
        bundled = run_calls(d)
    with deploy(made / "plain", simulate=True, verify=False) as d:
        attach_home_copies(d, made / "low4", experts)
        d.set_tokens(SPEC)
        api = run_calls(d)
    assert torch.equal(bundled[0], api[0]) and torch.equal(bundled[1], api[1]) and bundled[2] == api[2]
    tok = api[2]["token_policies"]["total"]
    assert tok["copy_pairs"] > 0 and tok["remote_tokens"] > 0
    continuations, cli = cli_generate(out, tmp_path, capsys)
    assert continuations == text
    assert cli == text_counts and cli["token_policies"]["total"]["copy_pairs"] > 0


def api_sources(made, out, home):
    """What attach_home_copy_sources is given for the copies of `home` in bundles `out` (one or two parts)."""
    desc = description(out, home)
    if "high" not in desc:
        return [(made / "low4", desc["experts"])]
    high = desc["high"]["experts"]
    return [(made / "hi8", high), (made / "low4", [sorted(set(a) - set(h)) for a, h in zip(desc["experts"], high)])]


@pytest.mark.parametrize("bundles", ["out", "mixed"])
def test_every_home_computes_on_its_own_copies(made, bundles):
    """Three homes (sequences round robin): each home loads its own copies bundle (single- or mixed-bit), and each
    one's counts equal a single-home run of its rows with its copies attached through the Python API."""
    out = made / bundles
    with deploy(out, simulate=True, tokens=SPEC, homes=(0, 1, 2)) as d:
        logits = d(IDS, MASK)
        per_home = {h: c.counts() for h, c in d.home_counters().items()}
        for h, member in d.members.items():
            held = member.tokens.state.copies
            want = torch.zeros_like(held)
            for layer, ids in enumerate(description(out, h)["experts"]):
                want[layer, ids] = True
            assert torch.equal(held, want)
    for h in range(3):
        rows = torch.arange(IDS.shape[0])[h::3]
        with deploy(made / "plain", simulate=True, homes=(h, *[x for x in range(3) if x != h]), verify=False) as d:
            front = d.front
            attach_home_copy_sources(front, api_sources(made, out, h))
            front.set_tokens(SPEC)
            alone = front(IDS[rows], MASK[rows])
            counts = front.counters.counts()
        assert torch.equal(alone, logits[rows])
        assert counts["token_policies"] == per_home[h]["token_policies"]
        assert per_home[h]["token_policies"]["total"]["copy_pairs"] > 0


def test_copies_from_several_checkpoints_compute_each_expert_with_its_source(made):
    """Mixed-bit copies (attach_home_copy_sources): the copies split over two sources of the same checkpoint give
    exactly the outputs, bytes and counts of one source; with another checkpoint for one part its bytes and outputs
    change; an expert copied from two sources is refused."""
    experts = description(made / "out", 0)["experts"]
    first = [ids[:len(ids) // 2] for ids in experts]
    second = [ids[len(ids) // 2:] for ids in experts]
    assert sum(map(len, first)) > 0 and sum(map(len, second)) > 0
    runs = {}
    for name, sources in (("one", [(made / "low4", experts)]), ("split", [(made / "low4", first),
                                                                          (made / "low4", second)]),
                          ("mixed", [(made / "ck", first), (made / "low4", second)])):
        with deploy(made / "plain", simulate=True, verify=False) as d:
            nbytes = attach_home_copy_sources(d, sources)
            d.set_tokens(SPEC)
            runs[name] = (nbytes, *run_calls(d))
    one, split, mixed = runs["one"], runs["split"], runs["mixed"]
    assert split[0] == one[0] and torch.equal(split[1], one[1]) and torch.equal(split[2], one[2])
    assert split[3] == one[3] and one[3]["token_policies"]["total"]["copy_pairs"] > 0
    assert mixed[0] != one[0] and mixed[3]["token_policies"]["total"]["copy_pairs"] > 0
    assert not torch.equal(mixed[1], one[1])  # the first part computed with ck's tensors
    with deploy(made / "plain", simulate=True, verify=False) as d:
        with pytest.raises(MoecompressError, match="copied from two checkpoints"):
            attach_home_copy_sources(d, [(made / "low4", experts), (made / "ck", first)])


def test_mixed_bit_bundle_holds_the_hottest_at_high_bits_within_the_budget(made, capsys):
    """shard --home-copies 4 --home-copies-high 8: each home's one copies bundle holds both widths; the experts are
    the bench's choice (choose_home_copies at 8 bits within half the budget, then at 4 bits in what is left), the
    tensors the sources' rows; verify checks it, inspect shows it."""
    from moecompress.shard.home import choose_home_copies

    out = made / "mixed"
    doc = verify_bundles(out)
    assert cli_main(["verify", str(out)]) == 0
    placement = Placement.from_json(doc)
    budget = int(BUDGET * server_expert_bytes(placement).mean())
    low4_bytes, _ = checkpoint_sizes(made / "low4")
    hi8_bytes, _ = checkpoint_sizes(made / "hi8")
    mass = load_mass(made / "stats")
    spread = set()
    for server in range(3):
        desc = description(out, server)
        high, experts = desc["high"]["experts"], desc["experts"]
        assert desc["home"] == server and desc["bits"] == 4 and desc["high"]["bits"] == 8
        want_high = choose_home_copies(placement, mass, hi8_bytes, int(0.5 * budget), home=server)
        spent = sum(int(hi8_bytes[layer, e]) for layer, ids in enumerate(want_high) for e in ids)
        rest = mass.copy()
        for layer, ids in enumerate(want_high):
            rest[layer, ids] = 0.0
        want_low = choose_home_copies(placement, rest, low4_bytes, budget - spent, home=server)
        assert high == want_high and experts == [sorted(a + b) for a, b in zip(want_high, want_low)]
        assert sum(map(len, high)) > 0 and sum(map(len, want_low)) > 0
        assert desc["bytes"] == spent + sum(int(low4_bytes[layer, e]) for layer, ids in enumerate(want_low)
                                            for e in ids) <= budget
        assert spent <= 0.5 * budget
        spread.add(json.dumps(experts))
        layer = next(i for i, ids in enumerate(high) if ids and want_low[i])
        path = doc["experts_paths"][layer]
        with safe_open(str(out / f"server-{server}" / HOME_COPIES_DIR / "model.safetensors"), "pt") as f, \
                safe_open(str(made / "hi8" / "model.safetensors"), "pt") as g8, \
                safe_open(str(made / "low4" / "model.safetensors"), "pt") as g4:
            for bits, ids, g in ((8, high[layer], g8), (4, want_low[layer], g4)):
                key = f"{group_prefix(path, 'down', bits)}.qweight"
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)[ids])
    assert len(spread) == 3  # every home its own copies
    capsys.readouterr()
    assert cli_main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "home copies (8/4-bit mixed, 8-bit on a share 0.5" in shown
    h0 = json.loads((out / PLACEMENT_FILE).read_text())["traffic"]["home_copies"]["homes"]["0"]
    assert h0["high_experts"] == sum(map(len, description(out, 0)["high"]["experts"]))
    assert f"home 0: {h0['experts']} experts ({h0['high_experts']} at 8 bits)" in shown


def load_mass(stats):
    from moecompress.artifacts.calibration_stats import CalibrationStats

    return CalibrationStats.load(stats).mass.numpy()


def test_a_mixed_bit_run_equals_the_python_api(made, tmp_path, capsys):
    """generate --bundles on mixed-bit copies == deploy(tokens=...) == deploy + attach_home_copy_sources([(hi8,
    high), (low4, rest)]): the same logits, tokens, counts and copy bytes; copy_bits=4 (the low width) is the same
    run, copy_bits=8 is refused."""
    out = made / "mixed"
    with deploy(out, simulate=True, tokens=SPEC) as d:
        text = d.generate_text(["hello ed", "ge"], max_new_tokens=4)
        text_counts = d.reset_counters().counts()
        bundled = run_calls(d)
    with deploy(out, simulate=True, tokens=SPEC.replace("copies=true", "copies=true,copy_bits=4")) as d:
        low_named = run_calls(d)
    with deploy(made / "plain", simulate=True, verify=False) as d:
        nbytes = attach_home_copy_sources(d, api_sources(made, out, 0))
        d.set_tokens(SPEC)
        api = run_calls(d)
    with deploy(made / "out", simulate=True, tokens=SPEC) as d:
        single = run_calls(d)
    assert nbytes == description(out, 0)["bytes"]
    assert torch.equal(bundled[0], api[0]) and torch.equal(bundled[1], api[1]) and bundled[2] == api[2]
    assert torch.equal(low_named[0], api[0]) and torch.equal(low_named[1], api[1])
    named, want = ({k: v for k, v in c["token_policies"].items() if k != "spec"} for c in (low_named[2], api[2]))
    assert named == want  # the same counts (the spec string names copy_bits=4)
    assert api[2]["token_policies"]["total"]["copy_pairs"] > 0
    assert not torch.equal(single[0], api[0])  # other copies than the single-width bundle's
    assert cli_generate(out, tmp_path, capsys) == (text, text_counts)
    with pytest.raises(MoecompressError, match="asks for 8-bit home copies.*holds 8/4-bit mixed copies.*copy_bits=4"):
        deploy(out, simulate=True, tokens=SPEC.replace("copies=true", "copies=true,copy_bits=8"))


def test_mixed_bit_bad_input_is_a_clear_error(made, tmp_path, capsys):
    base = ["shard", "--model", str(made / "ck"), "--stats", str(made / "stats"), "--servers", "3x1GB",
            "--mode", "expert", "--home-copies-budget", str(BUDGET)]
    low = ["--home-copies", "4", "--home-copies-from", str(made / "low4")]
    for extra, message in (
            ([*low, "--home-copies-high", "4"], "--home-copies-high 4: bits above --home-copies 4"),
            ([*low, "--home-copies-high", "3"], "--home-copies-high 3: bits above --home-copies 4"),
            ([*low, "--home-copies-high", "8", "--home-copies-high-share", "1.5"],
             "--home-copies-high-share 1.5: a number in \\[0, 1\\]"),
            ([*low, "--home-copies-high", "8", "--home-copies-high-share", "nan"], "--home-copies-high-share nan"),
            ([*low, "--home-copies-high-share", "0.5"], "--home-copies-high-share is for mixed-bit copies"),
            (["--home-copies-high", "8"], "add --home-copies BITS"),
            ([*low, "--home-copies-high", "8", "--home-copies-high-from", str(made / "low4")],
             "--home-copies-high 8: .*low4 stores no expert at 8 bits"),
            ([*low, "--home-copies-high", "8"],  # ck: no expert at 8 bits in every projection, copies at 4
             "--home-copies-high 8: .*ck stores no expert at 8 bits in every projection \\(its low-bit copies are "
             "at 4 bits\\); pass --home-copies-high-from")):
        rc = cli_main(base + ["--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (extra, err)
        assert re.search(message, err[0]), (extra, err[0])
        assert not (tmp_path / "o").exists()
    # a description whose high part is not among its experts, or not above the low bits: refused at load
    for change in (lambda d: d["high"]["experts"][0].append(99), lambda d: d["high"].update(bits=4)):
        bad = tmp_path / "bad"
        shutil.copytree(made / "mixed", bad)
        target = bad / "server-0" / HOME_COPIES_DIR / HOME_COPIES_FILE
        desc = json.loads(target.read_text())
        change(desc)
        target.write_text(json.dumps(desc))
        with pytest.raises(MoecompressError, match="a \"high\" part at higher bits"):
            deploy(bad, simulate=True, tokens=SPEC, verify=False)
        shutil.rmtree(bad)


@pytest.mark.slow
@pytest.mark.usefixtures("rank_threads")
@pytest.mark.parametrize("bundles", ["out", "mixed"])
def test_processes_load_every_homes_copies_as_the_simulation(made, bundles):
    """Real gloo processes, one home and three homes, single- and mixed-bit copies: the outputs and every count equal
    the simulation's."""
    for homes in (None, (0, 1, 2)):
        runs = []
        for simulate in (True, False):
            with deploy(made / bundles, simulate=simulate, tokens=SPEC, homes=homes, timeout=60) as d:
                runs.append((d(IDS, MASK), d.generate(IDS, MASK, max_new_tokens=3, stop_at_eos=False),
                             d.counters.counts()))
        (sim_l, sim_t, sim), (real_l, real_t, real) = runs
        assert torch.equal(real_l, sim_l) and torch.equal(real_t, sim_t) and real == sim
        assert real["token_policies"]["total"]["copy_pairs"] > 0


def test_bad_input_is_a_clear_error(made, tmp_path, capsys):
    with pytest.raises(MoecompressError, match="home-copies is missing.*--home-copies BITS"):
        deploy(made / "plain", simulate=True, tokens=SPEC)
    with pytest.raises(MoecompressError, match="asks for 2-bit home copies.*holds 4-bit"):
        deploy(made / "out", simulate=True, tokens=SPEC.replace("copies=true", "copies=true,copy_bits=2"))
    with pytest.raises(MoecompressError, match="copy_bits must be one of 0, 2, 3, 4, 8"):
        deploy(made / "out", simulate=True, tokens="localize:copies=true,copy_bits=5")
    base = ["shard", "--model", str(made / "ck"), "--stats", str(made / "stats"), "--servers", "3x1GB",
            "--mode", "expert"]
    for extra, message in (
            (["--home-copies", "3"], "cannot give 3-bit copies \\(its low-bit copies are at 4 bits\\)"),
            (["--home-copies", "5"], "--home-copies 5: allowed bits 2, 3, 4, 8"),
            (["--home-copies", "4", "--home-copies-budget", "-1"], "--home-copies-budget -1.0: a number >= 0"),
            (["--home-copies", "2", "--home-copies-from", str(made / "low4")], "stores no expert at 2 bits"),
            (["--home-copies", "4", "--home-copies-from", str(made / "stats")], "no config.json|moecompress.json"),
            (["--home-copies", "4", "--mode", "pipeline"], "pipeline model has none")):
        rc = cli_main(base + ["--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (extra, err)
        assert re.search(message, err[0]), (extra, err[0])
        assert not (tmp_path / "o").exists()
    # a copies file altered after shard: named by verify and refused by a run that loads it (verify=False skips
    # the sha256 checks of the bundle and of its copies alike: the run starts)
    bad = tmp_path / "bad"
    shutil.copytree(made / "out", bad)
    target = bad / "server-0" / HOME_COPIES_DIR / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match="home-copies/model.safetensors: sha256"):
        verify_bundles(bad)
    with pytest.raises(MoecompressError, match="sha256 does not match"):
        deploy(bad, simulate=True, tokens=SPEC)
    with deploy(bad, simulate=True, tokens=SPEC, verify=False) as d:
        d.forward(IDS, MASK)
        assert d.counters.counts()["token_policies"]["total"]["copy_pairs"] > 0
