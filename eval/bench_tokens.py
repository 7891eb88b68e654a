"""Token policies of the expert model, measured through the edge runtime: cross-server traffic and round trips
against quality.

The model's experts are RTN-quantized (`--bits`, group 64) and exported; `moecompress shard`'s expert-model
placement for `--servers` servers (affinity partitioning of the calibration routing + hot-expert replicas, dense
weights on every server) is written as bundles, and every configuration runs through `deploy(OUT, simulate=True)`
(the same outputs and counters as the real gloo run; tests/test_edge_tokens.py holds that) with the policies
switched on the running deployment (`Deployment.set_tokens`). Nothing is computed outside the runtime.

Per configuration, on the evaluation text (never the calibration text; forward calls of `--batch` sequences):
perplexity, Δppl against the full float32 model and against the lossless deployment, KL(full || run) per token,
cross-server bytes per token as the counters report them, and the counters' remote token x layer count: at batch 1
each is one round trip, so remote tokens / tokens is the round trips per decoded token that per-token policies
give (fusion needs several rows per call, so at batch 1 it acts not). Then a real decode through the runtime:
`--decode-prompts` prompts of the eval text, each decoded alone (batch 1) for `--decode-tokens` tokens; the
counters of the decode steps give measured round trips and bytes per decoded token, and the modeled decode time
per token on the `lan` and `wan` profiles (execution/timing.py: compute on the critical path from a compute profile
measured here + hops x latency + bytes / rate), next to the pipeline model on the same servers (shard's pipeline
placement over all servers, decoded through the runtime the same way). `--home-replicas N` places with shard's
home replicas (shard/home.py): equal memory by default, `--home-memory fit` grows the home to what they need;
`--home-bits B` stores those N experts per layer at B bits (GPTQ by default; shard/home.home_bit_plan) so that more
of them fit the home at equal memory. `--copies-bits B` gives the home low-bit copies of remote experts **in addition**
to its share (every expert quantized at B bits with the pipeline's quantizer, the remote ones with the most calibration
routing mass per byte within `--copies-budget` x a server's expert bytes: shard.home.choose_home_copies; attached
with runtime/edge/tokens_copies.attach_home_copies, as `moecompress shard --home-copies B --home-copies-from CKPT` and
a deployment's `localize:copies=true` do) for the curve `copies` (`localize:copies=true`: a token whose remote experts
all have copies computes them on the home, no round trip); `--per-layer-copies` also picks per-layer copy thresholds
on calibration text; `--copies-high-bits 8 --copies-high-shares S,...` makes the copies mixed-bit within the same budget
(the hottest remote experts at 8 bits, the primaries' own RTN tensors, on a share S of it, the rest at --copies-bits;
one curve `copies_hiS` per share, attached with tokens_copies.attach_home_copy_sources). Every row is also compared
with shard's default expert placement at uniform `--bits` (its lossless run: Δppl 'vs default', round trips 'vs
default placement').

    nice .venv/bin/python eval/bench_tokens.py                       # refmoe-qwen3 -> eval/results/tokens.*
    nice .venv/bin/python eval/bench_tokens.py --home-replicas 4 --name tokens_home4
    nice .venv/bin/python eval/bench_tokens.py --model ../shared/models/refmoe-olmoe --name tokens_olmoe
    nice .venv/bin/python eval/bench_tokens.py --home-replicas 8 --home-bits 4 --name tokens_home8b4
    nice .venv/bin/python eval/bench_tokens.py --curves copies --copies-bits 4 --pick-on-calib 1.0 --name tokens_copies4
    nice .venv/bin/python eval/bench_tokens.py --curves copies --copies-bits 4 --copies-high-bits 8 --pick-on-calib 1.0
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.arch.adapters import describe  # noqa: E402
from moecompress.calibrate.dataset import build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.evaluate.run import load_eval_data  # noqa: E402
from moecompress.execution.counters import HEADER_BYTES, ID_BYTES, WEIGHT_BYTES  # noqa: E402
from moecompress.execution.timing import PROFILES  # noqa: E402
from moecompress.execution.tokens import expert_similarity, row_bytes  # noqa: E402
from moecompress.runtime.edge import deploy  # noqa: E402
from moecompress.shard import ServerSpec  # noqa: E402
from moecompress.shard.bundles import write_bundles  # noqa: E402
from moecompress.shard.command import checkpoint_layer_sizes, routing_stats  # noqa: E402
from moecompress.shard.compare import place  # noqa: E402
from moecompress.shard.home import home_bit_plan, hottest_experts, min_home_memory, place_home_replicas  # noqa: E402
from moecompress.shard.profile import measure_profile  # noqa: E402
from moecompress.execution.timing import profile_compute  # noqa: E402
from moecompress.execution.replay import decode_calls, replay  # noqa: E402


def configs(quick: bool, curves: str = "", localize: str = "", copy_thresholds: str = "",
            copies: bool = False, copies_localize: str = "0.0001", high_shares: tuple = ()
            ) -> list[tuple[str, str, str | None]]:
    """(curve, label, spec): baselines, then each policy on top of send once + int8 payloads, then combinations;
    `curves`: comma-separated curve names to keep (the baselines are always kept), "" for all."""
    rows = [("baseline", "naive per-(token, expert) bf16", "per_pair+bf16"),
            ("baseline", "send once bf16", "bf16"),
            ("baseline", "lossless (send once, float32)", "native"),
            ("baseline", "+ int8 payload", "int8"), ("baseline", "+ fp8 payload", "fp8")]
    grids = {  # the layer-level rules first: they are what can save round trips
        "localize_gap": ("localize:threshold={},measure=gap", (0.05, 0.075, 0.1, 0.125, 0.15, 0.2)),
        "localize": ("localize:threshold={}", tuple(float(v) for v in localize.split(",")) if localize else
                     (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7, 1.01)),
        "prune_layer": ("prune_layer:threshold={}", (0.05, 0.1, 0.2, 0.3)),
        "substitute": ("substitute:threshold={},scope=layer", (0.1, 0.2, 0.3, 0.5)),
        "prune_server": ("prune_server:threshold={},relative=true", (0.1, 0.2, 0.3, 0.5)),
        "skip_weakest": ("skip_weakest:threshold={}", (0.1, 0.2, 0.3, 0.5)),
        "fuse": ("fuse:threshold={}", (0.98, 0.95, 0.9, 0.8)),
        "copies": ("localize:threshold={},copies=true", tuple(float(v) for v in copies_localize.split(","))),
    }
    for curve, (fmt, values) in grids.items():
        if curve == "copies":  # with --copies-high-shares: one curve per share (`copies_hi S`, label `[hi S]`)
            for share in high_shares or (None,):
                tag = "" if share is None else f"[hi {share:g}] "
                for t in values:
                    for c in (tuple(float(v) for v in copy_thresholds.split(",")) if copy_thresholds else
                              (0.2, 0.3, 0.4, 0.5, 0.7, 2.0)):
                        rows.append(("copies" if share is None else f"copies_hi{share:g}",
                                     f"copies {tag}{t:g} / {c:g}", f"int8+{fmt.format(t)},copy_threshold={c}"))
            continue
        for v in values[::2] if quick else values:
            rows.append((curve, f"{curve} {v}", f"int8+{fmt.format(v)}"))
    protect = "protect:first=4"
    combos = [f"int8+{protect}+prune_layer:threshold=0.1+prune_server:threshold=0.2,relative=true+fuse:threshold=0.9",
              f"int8+{protect}+localize:threshold=0.35+prune_server:threshold=0.2,relative=true+fuse:threshold=0.9",
              f"int8+{protect}+localize:threshold=0.5+fuse:threshold=0.9",
              f"int8+{protect}+localize:threshold=0.7",
              f"int8+{protect}+localize:threshold=0.3+prune_layer:threshold=0.1+fuse:threshold=0.9"]
    rows += [("combined", f"combo {i + 1}", spec) for i, spec in enumerate(combos[:2] if quick else combos)]
    if not copies:  # the copies curve needs --copies-bits
        rows = [r for r in rows if not r[0].startswith("copies")]
    keep = set(filter(None, curves.split(",")))  # with --curves only the three baselines the ratios need
    return [r for r in rows if not keep or r[0].split("_hi")[0] in keep or r[2] in ("per_pair+bf16", "native", "int8")]


def export_rtn(model_path: str, bits: int, work: Path) -> Path:
    """RTN experts at `bits`, group 64, exported once into `work` (reused when present)."""
    from transformers import AutoModelForCausalLM

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    out = work / f"{Path(model_path).name}-rtn{bits}"
    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        layout = describe(model)
        quantized = quantize_model(model, layout, BitPlan.uniform(layout, bits, group_size=64), None,
                                   QuantizeOptions(method="rtn"), progress=False)
        export_checkpoint(model, layout, BitPlan.uniform(layout, bits, group_size=64), quantized, out,
                          overwrite=True)
    return out


def export_home_bits(model_path: str, tokenizer, args) -> tuple[Path, list[list[int]]]:
    """(checkpoint, home experts): the experts at `--bits` except each MoE layer's `--home-replicas` hottest
    (calibration on the bf16 model, as the export sees it) at `--home-bits`, quantized with `--home-quant` (GPTQ
    needs that calibration's Hessians); exported once into `--work` (reused when its bit groups match)."""
    from transformers import AutoModelForCausalLM

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model
    from moecompress.shard.bundles import read_spec_and_config

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    layout = describe(model)
    opts = CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len, hessians=args.home_quant == "gptq",
                              progress=False)
    cstats = calibrate(model, tokenizer, args.calib, opts)
    hot = hottest_experts(routing_stats(cstats), args.home_replicas)
    paths = [m.experts_path for m in layout.moe_layers]
    out = Path(args.work) / f"{Path(model_path).name}-hot{args.home_replicas}b{args.home_bits}{args.home_quant}"
    if (out / "config.json").exists():
        _, spec = read_spec_and_config(out)
        held = [sorted(next(iter(spec.experts[p].groups.values())).get(args.home_bits, ())) for p in paths]
        if held == [sorted(h) for h in hot]:
            return out, hot
    plan = home_bit_plan(BitPlan.uniform(layout, args.bits, group_size=64), paths, hot, args.home_bits)
    quantized = quantize_model(model, layout, plan, cstats, QuantizeOptions(method=args.home_quant), progress=False)
    export_checkpoint(model, layout, plan, quantized, out, overwrite=True)
    return out, hot


def export_copies(model_path: str, tokenizer, bits: int, quant: str, args) -> Path:
    """Every expert at `bits` (`quant`: the pipeline's quantizer, GPTQ by default, with Hessians from `--calib-samples`
    of the calibration text), exported once into `--work`: where the home's low-bit copies are read from
    (runtime/edge/tokens_copies.attach_home_copies keeps only the chosen experts)."""
    from transformers import AutoModelForCausalLM

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    out = Path(args.work) / f"{Path(model_path).name}-copies{bits}{quant}"
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    layout = describe(model)
    cstats = None
    if quant == "gptq":
        cstats = calibrate(model, tokenizer, args.calib, CalibrationOptions(samples=args.calib_samples,
                                                                            seq_len=args.seq_len, progress=False))
    plan = BitPlan.uniform(layout, bits, group_size=64)
    quantized = quantize_model(model, layout, plan, cstats, QuantizeOptions(method=quant), progress=False)
    export_checkpoint(model, layout, plan, quantized, out, overwrite=True)
    return out


def bundles(checkpoint: Path, tokenizer, args, home_checkpoint: Path | None = None, hot=None):
    """(expert-model bundles, pipeline bundles, share of experts on the home, expert placement, pipeline placement,
    extra bytes the home got beyond the equal share, shard's default expert placement, its bundles) of shard's
    placements. Memory: from `checkpoint` (the uniform one) always; `home_checkpoint` (low-bit home experts `hot`)
    is what the expert placement with home replicas is made of and written from."""
    sizes = checkpoint_layer_sizes(checkpoint)
    opts = CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len, hessians=False, progress=False)
    stats = routing_stats(calibrate(args.model, tokenizer, args.calib, opts))
    dense = int(sum(sizes.layer_dense_bytes) + sizes.head_bytes)
    memory = int(dense + args.slack * sizes.expert_bytes.sum() / args.servers)
    home_sizes = checkpoint_layer_sizes(home_checkpoint) if home_checkpoint else sizes
    work = Path(args.work)
    spec = ServerSpec(memory_bytes=(memory,) * args.servers, mode="expert", balance=args.balance)
    extra = 0
    if args.home_replicas and args.home_memory == "fit":  # the smallest home memory that holds them
        grown = min_home_memory(stats, home_sizes, spec, args.home_replicas)
        extra = grown - memory
        spec = replace(spec, memory_bytes=(grown,) + (memory,) * (args.servers - 1))
    expert = place_home_replicas(stats, home_sizes, spec, None, args.home_replicas, replicate=True, hot=hot)
    default = place(stats, sizes, replace(spec, memory_bytes=(memory,) * args.servers), None, replicate=True)
    pipeline = place(stats, sizes, ServerSpec(memory_bytes=(memory,) * args.servers, mode="pipeline"),
                     "all_servers")
    name = Path(args.model).name
    bits = f"b{args.home_bits}{args.home_quant}" if home_checkpoint else ""
    out_e = work / f"tokens-{name}-expert{args.servers}-h{args.home_replicas}{bits}{args.home_memory}"
    out_p = work / f"tokens-{name}-pipeline{args.servers}"
    out_d = work / f"tokens-{name}-expert{args.servers}-default"
    write_bundles(home_checkpoint or checkpoint, expert, out_e, overwrite=True)
    write_bundles(checkpoint, pipeline, out_p, overwrite=True)
    write_bundles(checkpoint, default, out_d, overwrite=True)
    local = float(np.mean([[int(expert.home) in copies for copies in layer] for layer in expert.assignment]))
    print(f"expert placement {expert.method}: home memory {spec.memory_bytes[0]} bytes (+{extra} beyond the equal "
          f"{memory}), home holds {local:.0%} of the experts", flush=True)
    return out_e, out_p, local, expert, pipeline, extra, default, out_d


def home_copies(args, tokenizer, placement) -> dict:
    """The home's low-bit copies: every expert at --copies-bits (export_copies), the remote experts with the most
    calibration routing mass per copy byte (shard.home.choose_home_copies) within --copies-budget x the mean
    server's expert bytes; {checkpoint, experts [L][ids], bytes, server_expert_bytes, home_expert_bytes}."""
    from moecompress.shard.home import choose_home_copies, choose_mixed_home_copies, copies_bytes
    from moecompress.shard.home_copies import server_expert_bytes

    checkpoint = export_copies(args.model, tokenizer, args.copies_bits, args.copies_quant, args)
    mass = calibrate(args.model, tokenizer, args.calib, CalibrationOptions(
        samples=args.calib_samples, seq_len=args.seq_len, hessians=False, progress=False)).mass.numpy()
    copy_bytes = checkpoint_layer_sizes(checkpoint).expert_bytes
    per_server = server_expert_bytes(placement)
    budget = int(args.copies_budget * per_server.mean())
    remote = sum(int(placement.home) not in s for row in placement.assignment for s in row)
    base = {"remote_experts": remote, "server_expert_bytes": float(per_server.mean()),
            "home_expert_bytes": float(per_server[placement.home])}
    if not args.high_shares:
        experts = choose_home_copies(placement, mass, copy_bytes, budget)
        nbytes = copies_bytes(copy_bytes, experts)
        print(f"home copies at {args.copies_bits} bits ({args.copies_quant}): {sum(map(len, experts))} of the "
              f"{remote} remote experts, {nbytes} bytes = {nbytes / per_server.mean():.1%} of a server's expert bytes "
              f"(mean {per_server.mean():.0f}), home's own experts {per_server[placement.home]:.0f}", flush=True)
        return {"checkpoint": str(checkpoint), "experts": experts, "bytes": nbytes, "copied": sum(map(len, experts)),
                "sources": [(str(checkpoint), experts)], **base}
    high = export_rtn(args.model, args.copies_high_bits, Path(args.work))  # RTN at --bits: the primaries themselves
    high_bytes = checkpoint_layer_sizes(high).expert_bytes
    variants = {}
    for share in args.high_shares:  # the hottest remote experts at high bits within share x budget, then low bits
        hot, low = choose_mixed_home_copies(placement, mass, high_bytes, copy_bytes, budget, share)
        nbytes = copies_bytes(high_bytes, hot) + copies_bytes(copy_bytes, low)
        experts = [sorted(a + b) for a, b in zip(hot, low)]
        print(f"home copies, high share {share:g}: {sum(map(len, hot))} at {args.copies_high_bits} bits (rtn) + "
              f"{sum(map(len, low))} at {args.copies_bits} bits ({args.copies_quant}) of the {remote} remote experts, "
              f"{nbytes} bytes = {nbytes / per_server.mean():.1%} of a server's expert bytes", flush=True)
        variants[share] = {"checkpoint": str(checkpoint), "high_checkpoint": str(high), "share": share,
                           "experts": experts, "high": hot, "bytes": nbytes, "copied": sum(map(len, experts)),
                           "copied_high": sum(map(len, hot)),
                           "sources": [(str(high), hot), (str(checkpoint), low)], **base}
    args.copies_variants = variants
    return variants[args.high_shares[0]]


@contextmanager
def deploy_expert(out_e, args):
    """The expert-model deployment (simulation), with the home's low-bit copies attached when --copies-bits."""
    with deploy(out_e, simulate=True, verify=False) as d:
        if args.copies:
            attach(d, args.copies)
        yield d


def attach(d, copies: dict) -> None:
    """Attach the copies variant `copies` (home_copies) to the running deployment `d` (replacing any)."""
    from moecompress.runtime.edge.tokens_copies import attach_home_copy_sources

    held = attach_home_copy_sources(d, copies["sources"])
    assert held == copies["bytes"], (held, copies["bytes"])  # the counted bytes are what it holds
    d.bench_copies = copies


def set_row(d, label: str, spec, args, similarity=None) -> None:
    """d.set_tokens(spec), after attaching the copies variant the row's label names (`[hi S]`) when it differs."""
    if "[hi " in label:
        share = float(label.split("[hi ")[1].split("]")[0])
        variant = args.copies_variants[share]
        if getattr(d, "bench_copies", None) is not variant:
            attach(d, variant)
    d.set_tokens(spec, similarity=similarity)


@torch.no_grad()
def similarity(model, tokenizer, layout, args) -> torch.Tensor:
    """[L, E, E] expert similarity from the full model's weights, probed with calibration hidden states."""
    data = build_calibration_data(args.calib, tokenizer, 2, args.seq_len, seed=5)
    probes, handles = {}, []
    for i, m in enumerate(layout.moe_layers):
        mod = model.get_submodule(m.experts_path)
        handles.append(mod.register_forward_hook(lambda mod, a, out, i=i: probes.update({i: a[0][::2].clone()})))
    try:
        model(input_ids=data.input_ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([expert_similarity(model.get_submodule(m.experts_path), m.num_experts, probe=probes[i])
                        for i, m in enumerate(layout.moe_layers)])


def decode_prompts(tokenizer, args) -> list[torch.Tensor]:
    with gzip.open(args.eval, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.decode_prompts), f)]
    return [tokenizer(t, return_tensors="pt")["input_ids"][:, :args.decode_context] for t in texts]


@torch.no_grad()
def decode(d, prompts, new_tokens: int, placement, profile) -> dict:
    """Batch-1 decoding through the runtime; the decode steps' counts (the prefill's subtracted). Modeled time per
    decoded token = compute on the critical path (execution/timing.profile_compute: the measured compute profile
    spread over the servers by the decode steps' pairs and requests) + hops x latency + bytes / rate."""
    hops = nbytes = steps = compute = 0
    for ids in prompts:
        d.reset_counters()
        d(ids)  # the prefill alone (generate's first call is the same call)
        pre = d.reset_counters()
        d.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
        gen = d.reset_counters()
        hops += int(gen.hops.sum() - pre.hops.sum())
        nbytes += int(gen.bytes.sum() - pre.bytes.sum())
        steps += new_tokens - 1
        only = SimpleNamespace(pairs=gen.pairs - pre.pairs, messages=gen.messages - pre.messages,
                               hops=gen.hops - pre.hops, calls=gen.calls - pre.calls)  # the decode steps' counters
        compute += profile_compute(placement, only, profile) * (new_tokens - 1)  # per call = per token (batch 1)
    out = {"decode_round_trips": hops / 2 / steps, "decode_bytes": nbytes / steps, "compute_ms": 1e3 * compute / steps}
    for name, p in PROFILES.items():
        out[f"net_ms_{name}"] = 1e3 * (hops * p.latency_seconds + nbytes / p.bytes_per_second) / steps
        out[f"ms_{name}"] = out["compute_ms"] + out[f"net_ms_{name}"]
    return out


@torch.no_grad()
def evaluate(d, data, ref_logp, batch: int) -> dict:
    d.reset_counters()
    nll = kl = 0.0
    count = 0
    for b, i in enumerate(range(0, data.input_ids.shape[0], batch)):
        ids = data.input_ids[i:i + batch]
        logp = d(ids).float()[:, :-1].log_softmax(-1)
        ref = ref_logp[b].float()
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        count += ids[:, 1:].numel()
    c = d.reset_counters()
    t = c.token_counts()
    tok = t["total"]
    out = {"ppl": float(np.exp(nll / count)), "kl": kl / count, "tokens": c.tokens,
           "bytes_per_token": float(c.bytes.sum()) / c.tokens, "bytes_by_precision": t["bytes_by_precision"],
           "round_trips_per_token": tok["remote_tokens"] / c.tokens,
           "batch1_bytes_per_token": batch1_bytes(d, c.token_policy, tok["token_rows"]) / c.tokens}
    out.update({k: tok[k] / c.tokens for k in ("pruned_pairs", "substituted_pairs", "fused_rows", "copy_pairs")})
    return out


def batch1_bytes(d, spec: str, token_rows: int) -> int:
    """Bytes had every token been its own call: a header and one row each way per (token, server) row sent."""
    precision = next((p for p in d.tokens.pipeline.policies if p.name == "precision"), None)
    disp, ret = (precision.dispatch, precision.return_) if precision else ("native", "native")
    H, k = d.model.config.hidden_size, d.model.config.num_experts_per_tok
    k_sent = 1 if "per_pair" in spec else k
    return token_rows * (HEADER_BYTES + row_bytes(disp, H, 4) + k_sent * (ID_BYTES + WEIGHT_BYTES)
                         + row_bytes(ret, H, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=8, help="RTN bits of the experts in the bundles")
    ap.add_argument("--slack", type=float, default=1.25, help="server memory: dense + slack x experts / servers")
    ap.add_argument("--balance", default="total", help="placement balance rule: total (shard's default) or layer")
    ap.add_argument("--decode-prompts", type=int, default=2)
    ap.add_argument("--decode-context", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=17)
    ap.add_argument("--home-replicas", type=int, default=0, help="shard's --home-replicas: a home copy of each MoE "
                    "layer's N most used experts (shard/home.py)")
    ap.add_argument("--home-memory", default="equal", choices=("equal", "fit"), help="equal: every server the same "
                    "memory (an error if the home replicas do not fit); fit: the home grown to the smallest memory "
                    "that holds them (reported)")
    ap.add_argument("--home-bits", type=int, default=0, help="store the home-copied experts (each layer's "
                    "--home-replicas hottest) at these bits everywhere (0: at --bits), so more copies fit the "
                    "home's memory (shard/home.home_bit_plan)")
    ap.add_argument("--home-quant", default="gptq", choices=("gptq", "rtn"), help="quantizer of the --home-bits "
                    "experts")
    ap.add_argument("--copies-bits", type=int, default=0, help="low-bit home copies of remote experts (2/3/4; 0: "
                    "none): every expert quantized at these bits (--copies-quant), the remote ones with the most "
                    "calibration routing mass per byte copied to the home within --copies-budget, used by the "
                    "curve `copies` (localize:copies=true)")
    ap.add_argument("--copies-quant", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--copies-high-bits", type=int, default=0, help="mixed-bit home copies (0: off): the hottest "
                    "remote experts copied at these bits (RTN, group 64; at --bits they are the primaries' own "
                    "tensors), the rest at --copies-bits, within the same --copies-budget")
    ap.add_argument("--copies-high-shares", default="0.5", help="with --copies-high-bits: "
                    "comma-separated shares of the budget spent on the high-bit copies (hottest remote experts by "
                    "calibration routing mass per byte first); each share is its own copies set on the copies curve "
                    "(curve copies_hiS, label `copies [hi S] T / C`): --pick-on-calib picks a threshold per share; default "
                    "0.5, the share that met the round-trip goal on both reference models (session 26)")
    ap.add_argument("--per-layer-copies", action="store_true", help="with --pick-on-calib and --copies-bits: also "
                    "pick per-MoE-layer copy thresholds on the calibration text (curve copies_layers): layers made "
                    "fully local on the copies, greedily by round trips saved per Δppl point")
    ap.add_argument("--copies-budget", type=float, default=1.0, help="bytes of the home copies, as a fraction of "
                    "the mean server's expert bytes in the expert placement")
    ap.add_argument("--copy-thresholds", default="", help="comma-separated copy_threshold values of the copies "
                    "curve (default 0.2,0.3,0.4,0.5,0.7,2)")
    ap.add_argument("--copies-localize", default="0.0001", help="comma-separated localize thresholds (weight of "
                    "the remote pairs without a copy) of the copies curve")
    ap.add_argument("--localize", default="", help="comma-separated localize thresholds (default: the built-in grid)")
    ap.add_argument("--curves", default="", help="comma-separated curves to run (then of the baselines only naive, "
                    "lossless and int8): localize_gap, localize, prune_layer, substitute, prune_server, "
                    "skip_weakest, fuse, combined; default all")
    ap.add_argument("--quick", action="store_true", help="fewer thresholds (development)")
    ap.add_argument("--pick-on-calib", type=float, default=None, metavar="DPPL", help="decide each curve's threshold "
                    "on calibration text (a fresh sample of --calib, never the eval text): the one with the fewest "
                    "round trips/token whose Δppl there (vs this placement's and the default's lossless run) is <= "
                    "DPPL %%; only those rows (and the baselines) are then measured on the eval text")
    ap.add_argument("--per-layer", type=int, default=0, metavar="V", help="with --pick-on-calib: also pick "
                    "per-MoE-layer localize thresholds on the calibration text, trying each layer at the next V "
                    "values of the localize grid (curve localize_layers)")
    ap.add_argument("--work", default="/tmp/moecompress-bench-tokens")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--name", default="tokens", help="stem of the output files")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    checkpoint = export_rtn(args.model, args.bits, Path(args.work))
    home_checkpoint, hot = export_home_bits(args.model, tokenizer, args) if args.home_bits else (None, None)
    out_e, out_p, local, placement_e, placement_p, extra, default, out_d = bundles(checkpoint, tokenizer, args,
                                                                                   home_checkpoint, hot)
    torch.set_num_threads(1)
    profile = measure_profile(checkpoint, batch=1, context=args.decode_context, reps=7, dtype=torch.float32)
    torch.set_num_threads(threads)
    print(f"compute profile (batch 1, context {args.decode_context}): "
          f"{1e3 * (profile.head_seconds + sum(profile.layer_seconds)):.2f} ms per decode step, experts "
          f"{1e3 * sum(profile.moe_seconds):.2f} ms ({profile.source})", flush=True)
    args.high_shares = tuple(float(v) for v in args.copies_high_shares.split(",")) if args.copies_high_bits else ()
    rows = configs(args.quick, args.curves, args.localize, args.copy_thresholds, bool(args.copies_bits),
                   args.copies_localize, args.high_shares)
    args.copies = home_copies(args, tokenizer, placement_e) if args.copies_bits else None
    sim = similarity(model, tokenizer, layout, args) if any("substitute" in r[2] for r in rows) else None
    data = load_eval_data(args.eval, tokenizer, args.samples, args.seq_len, calibration=args.calib)
    with torch.no_grad():
        ref_logp = [model(input_ids=data.input_ids[i:i + args.batch]).logits[:, :-1].float().log_softmax(-1)
                    .to(torch.bfloat16) for i in range(0, args.samples, args.batch)]
    if args.pick_on_calib is not None:  # calibration text for the thresholds: a fresh sample, never the eval text
        pick_data = build_calibration_data(args.calib, tokenizer, args.samples, args.seq_len, seed=11)
        with torch.no_grad():
            pick_ref = [model(input_ids=pick_data.input_ids[i:i + args.batch]).logits[:, :-1].float().log_softmax(-1)
                        .to(torch.bfloat16) for i in range(0, args.samples, args.batch)]
    ids = data.input_ids
    full_ppl = float(np.exp(-sum(r.float().gather(-1, ids[i * args.batch:(i + 1) * args.batch, 1:, None]).sum().item()
                                 for i, r in enumerate(ref_logp)) / ids[:, 1:].numel()))
    trace = calibrate(model, tokenizer, data, CalibrationOptions(samples=args.samples, seq_len=args.seq_len,
                                                                 hessians=False, progress=False, trace=True))
    experts = trace.trace_indices.numpy()  # [T, L, k] the float model's routing of the eval text
    hidden = model.config.hidden_size
    replayed = {name: float(replay(p, experts, decode_calls(experts.shape[0], 1), hidden, 2).hops.sum()) / 2
                / experts.shape[0] for name, p in (("placement", placement_e), ("default", default))}
    print(f"replayed lossless round trips/token (float routing): {replayed}", flush=True)
    del model
    prompts = decode_prompts(tokenizer, args)
    with deploy(out_p, simulate=True, verify=False) as d:
        pipe = decode(d, prompts, args.decode_tokens, placement_p, profile)
    with deploy(out_d, simulate=True, verify=False) as d:  # the reference: shard's default placement, uniform bits
        d.set_tokens("native")
        base = evaluate(d, data, ref_logp, args.batch)
        base.update(decode(d, prompts, args.decode_tokens, default, profile))
    print(f"default placement, lossless: ppl {base['ppl']:.4f}, round trips/token {base['round_trips_per_token']:.3f}, "
          f"decode {base['decode_round_trips']:.3f}", flush=True)
    print(f"home holds {local:.0%} of the experts; full model ppl {full_ppl:.3f}; pipeline {pipe}; setup "
          f"{time.time() - t0:.0f}s", flush=True)
    if args.pick_on_calib is not None:
        rows = pick_on_calibration(rows, out_e, out_d, pick_data, pick_ref, args)
    results = []
    with deploy_expert(out_e, args) as d:
        for curve, label, spec in rows:
            t1 = time.time()
            set_row(d, label, spec, args, similarity=sim if spec and "substitute" in spec else None)
            r = evaluate(d, data, ref_logp, args.batch)
            r.update(decode(d, prompts, args.decode_tokens, placement_e, profile))
            r.update(curve=curve, label=label, spec=spec or "none", dppl_full=100 * (r["ppl"] / full_ppl - 1))
            results.append(r)
            print(f"{label:<34} ppl {r['ppl']:.3f} ({r['dppl_full']:+.2f}% vs full) KL {r['kl']:.4f} "
                  f"B/tok {r['bytes_per_token']:.0f} rt/tok {r['round_trips_per_token']:.2f} decode rt "
                  f"{r['decode_round_trips']:.2f} ({time.time() - t1:.0f}s)", flush=True)
            write(results, pipe, full_ppl, args, local, extra, profile, replayed, time.time() - t0, base,
                  quiet=True)  # partial
    write(results, pipe, full_ppl, args, local, extra, profile, replayed, time.time() - t0, base)


def calib_dppl(m: dict, lossless: dict, base: dict) -> float:
    """Δppl % of a calibration-text run against this placement's lossless run and the default placement's (the
    larger): what every pick on calibration text compares with --pick-on-calib."""
    return 100 * max(m["ppl"] / lossless["ppl"] - 1, m["ppl"] / base["ppl"] - 1)


def calib_runner(d, spec_of, what: str, data, ref_logp, args, dppl):
    """run(values): set the deployment `d`'s token policy to spec_of(values), measure it on the calibration text and
    print one line (`what`: which per-layer knob the values are) -> the metrics."""
    def run(values):
        d.set_tokens(spec_of(values))
        m = evaluate(d, data, ref_logp, args.batch)
        print(f"calibration text: {what} {'/'.join(f'{v:g}' for v in values):<30} ppl {m['ppl']:.3f} "
              f"(Δppl {dppl(m):+.2f} %) rt/tok {m['round_trips_per_token']:.2f}", flush=True)
        return m
    return run


def undo_over_limit(run, now: list, taken: list, start: float, limit: float, dppl):
    """Measure the per-layer thresholds `now` (layers in `taken` raised, in that order) and undo the last raise back
    to `start` while Δppl is over `limit` -> (metrics, thresholds) of the first combination within it, or None."""
    while taken:
        m = run(now)
        if dppl(m) <= limit:
            return m, list(now)
        now[taken.pop()] = start
    return None


def pick_on_calibration(rows, out_e, out_d, data, ref_logp, args) -> list:
    """The baselines and, per curve, the row with the fewest round trips/token whose Δppl on calibration text
    (against this placement's lossless run and the default placement's, the larger) is <= --pick-on-calib; none
    when no threshold qualifies. The label says what calibration measured."""
    with deploy(out_d, simulate=True, verify=False) as d:
        d.set_tokens("native")
        base = evaluate(d, data, ref_logp, args.batch)
    measured = {}
    with deploy_expert(out_e, args) as d:
        for curve, label, spec in rows:
            set_row(d, label, spec, args)
            measured[label] = evaluate(d, data, ref_logp, args.batch)
            print(f"calibration text: {label:<30} ppl {measured[label]['ppl']:.3f} rt/tok "
                  f"{measured[label]['round_trips_per_token']:.2f}", flush=True)
    lossless = next(measured[label] for _, label, spec in rows if spec == "native")
    kept = [r for r in rows if r[0] == "baseline"]
    for curve in dict.fromkeys(r[0] for r in rows if r[0] != "baseline"):
        ok = []
        for c, label, spec in rows:
            m = measured[label]
            dppl = calib_dppl(m, lossless, base)
            if c == curve and dppl <= args.pick_on_calib:
                ok.append((m["round_trips_per_token"], dppl, label, spec))
        if ok:
            rt, dppl, label, spec = min(ok)
            kept.append((curve, f"{label} (picked on calib: Δppl {dppl:+.2f} %, rt/tok {rt:.2f})", spec))
        print(f"calibration pick for {curve}: {kept[-1][1] if ok else 'none within the limit'}", flush=True)
    if args.per_layer:
        kept += per_layer_pick(rows, measured, lossless, base, out_e, data, ref_logp, args)
    if args.per_layer_copies:
        kept += per_layer_copies_pick(rows, measured, lossless, base, out_e, data, ref_logp, args)
    return kept


def per_layer_copies_pick(rows, measured, lossless, base, out_e, data, ref_logp, args) -> list:
    """Per-MoE-layer copy thresholds, decided on the calibration text: from the copies curve's uniform pick C (the
    fewest round trips within --pick-on-calib), each layer alone is made fully local on the copies (its copy
    threshold raised to the grid's largest value, the others at C) and measured; the raises are taken greedily, most
    round trips saved per Δppl point first, while the summed Δppl increments fit the limit; the combination is
    measured and the last raise undone while it is over. Returns the picked row (curve `copies_layers`) or none."""
    def dppl(m):
        return calib_dppl(m, lossless, base)

    if args.high_shares:
        print("calibration pick for copies_layers: not with mixed-bit copies (--copies-high-bits)", flush=True)
        return []
    knob = lambda spec, name: float(spec.split(f"{name}=")[1].split(",")[0])  # noqa: E731
    curve = [(measured[label], spec) for c, label, spec in rows if c == "copies"]
    ok = [(m["round_trips_per_token"], knob(spec, "copy_threshold"), spec) for m, spec in curve
          if dppl(m) <= args.pick_on_calib]
    if not ok:
        print("calibration pick for copies_layers: no uniform copy threshold within the limit", flush=True)
        return []
    _, pick, pick_spec = min(ok)
    full = max(knob(spec, "copy_threshold") for _, spec in curve)
    if pick == full:
        print("calibration pick for copies_layers: the uniform pick makes every layer local already", flush=True)
        return []
    t = knob(pick_spec, "threshold")
    spec_of = lambda cs: (f"int8+localize:threshold={t:g},copies=true,copy_thresholds="  # noqa: E731
                          + "/".join(f"{c:g}" for c in cs))
    # starts: the uniform pick and the two grid values below it (room in the budget for whole layers)
    starts = sorted({knob(spec, "copy_threshold") for _, spec in curve if knob(spec, "copy_threshold") <= pick})[-3:]
    num_layers = len(json.loads((Path(out_e) / "placement.json").read_text())["assignment"])
    found = []  # (round trips, Δppl, thresholds)
    with deploy_expert(out_e, args) as d:
        run = calib_runner(d, spec_of, "copy thresholds", data, ref_logp, args, dppl)
        for start in starts:
            at_start = next(m for m, spec in curve if knob(spec, "copy_threshold") == start)
            steps = []
            for layer in range(num_layers):
                cs = [start] * num_layers
                cs[layer] = full
                m = run(cs)
                saved = at_start["round_trips_per_token"] - m["round_trips_per_token"]
                cost = max(dppl(m) - dppl(at_start), 0.0)
                if saved > 0:
                    steps.append((saved / max(cost, 1e-3), layer, cost))
            now, taken, budget = [start] * num_layers, [], args.pick_on_calib - dppl(at_start)
            for _, layer, cost in sorted(steps, reverse=True):
                if cost <= budget:
                    budget -= cost
                    taken.append(layer)
                    now[layer] = full
            fit = undo_over_limit(run, now, taken, start, args.pick_on_calib, dppl)
            if fit is not None:
                found.append((fit[0]["round_trips_per_token"], dppl(fit[0]), fit[1]))
    if not found:
        print("calibration pick for copies_layers: none within the limit", flush=True)
        return []
    rt, dp, now = min(found)
    label = (f"copies per layer {'/'.join(f'{c:g}' for c in now)} (picked on calib: Δppl {dp:+.2f} %, rt/tok "
             f"{rt:.2f})")
    print(f"calibration pick for copies_layers: {label}", flush=True)
    return [("copies_layers", label, spec_of(now))]


def per_layer_pick(rows, measured, lossless, base, out_e, data, ref_logp, args) -> list:
    """Per-MoE-layer localize thresholds, decided on the calibration text: from one grid step below the uniform pick
    of the `localize` curve (or 0), each layer alone is raised to each of the next `--per-layer` grid values (the
    others kept) and measured; then the raises are taken greedily, most round trips saved per Δppl point first,
    while the summed Δppl increments stay within --pick-on-calib; the combination is measured once more and the
    last raise undone while it is over the limit. Returns the picked row (curve `localize_layers`) or none."""
    def dppl(m):
        return calib_dppl(m, lossless, base)

    threshold = lambda spec: float(spec.split("threshold=")[1].split(",")[0])  # noqa: E731
    ok = [(measured[label]["round_trips_per_token"], threshold(spec)) for c, label, spec in rows
          if c == "localize" and dppl(measured[label]) <= args.pick_on_calib]
    grid = sorted({threshold(spec) for c, _, spec in rows if c == "localize"})
    if not grid:
        return []
    pick = min(ok)[1] if ok else grid[0]  # the uniform pick
    start = max([g for g in grid if g < pick], default=0.0)  # one grid step below it: room to raise some layers
    spec_of = lambda ts: "int8+localize:thresholds=" + "/".join(f"{t:g}" for t in ts)  # noqa: E731
    num_layers = len(json.loads((Path(out_e) / "placement.json").read_text())["assignment"])
    with deploy_expert(out_e, args) as d:
        run = calib_runner(d, spec_of, "per-layer", data, ref_logp, args, dppl)
        now = [start] * num_layers
        at_start = run(now)
        steps = []  # (rt saved per Δppl point, layer, value, rt saved, Δppl added)
        for layer in range(num_layers):
            for v in [g for g in grid if g > start][:args.per_layer]:
                ts = list(now)
                ts[layer] = v
                m = run(ts)
                saved = at_start["round_trips_per_token"] - m["round_trips_per_token"]
                cost = max(dppl(m) - dppl(at_start), 1e-3)
                if saved > 0:
                    steps.append((saved / cost, layer, v, saved, cost))
        budget = args.pick_on_calib - dppl(at_start)
        taken = []  # layers raised, in the order taken
        for _, layer, v, saved, cost in sorted(steps, reverse=True):
            if layer not in taken and cost <= budget:  # one raise per layer, the most efficient that fits
                budget -= cost
                taken.append(layer)
                now[layer] = v
        fit = undo_over_limit(run, now, taken, start, args.pick_on_calib, dppl)
        if fit is not None:
            m, now = fit
            label = (f"localize per layer {'/'.join(f'{t:g}' for t in now)} (picked on calib: Δppl "
                     f"{dppl(m):+.2f} %, rt/tok {m['round_trips_per_token']:.2f})")
            print(f"calibration pick for localize_layers: {label}", flush=True)
            return [("localize_layers", label, spec_of(now))]
    print("calibration pick for localize_layers: none within the limit", flush=True)
    return []


def write(results, pipe, full_ppl, args, local, extra, profile, replayed, seconds, base, quiet=False):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    naive = results[0]
    lossless = next((r for r in results if r["spec"] == "none"), results[0])
    for r in results:
        r["bytes_vs_naive"] = r["bytes_per_token"] / naive["bytes_per_token"]
        r["round_trips_vs_lossless"] = r["round_trips_per_token"] / max(lossless["round_trips_per_token"], 1e-9)
        r["decode_round_trips_vs_lossless"] = r["decode_round_trips"] / max(lossless["decode_round_trips"], 1e-9)
        r["dppl"] = 100 * (r["ppl"] / lossless["ppl"] - 1)
        r["dppl_default"] = 100 * (r["ppl"] / base["ppl"] - 1)  # against shard's default placement, uniform bits
        r["round_trips_vs_default"] = r["round_trips_per_token"] / max(base["round_trips_per_token"], 1e-9)
        r["decode_round_trips_vs_default"] = r["decode_round_trips"] / max(base["decode_round_trips"], 1e-9)
    ok = [r for r in results if max(r["dppl"], r["dppl_default"]) <= 1.0] or results
    best_bytes = min(ok, key=lambda r: r["bytes_vs_naive"])
    best_rt = min(ok, key=lambda r: r["round_trips_vs_lossless"])
    best_rtd = min(ok, key=lambda r: r["round_trips_vs_default"])
    model = Path(args.model).name
    lines = [f"# Token policies through the edge runtime: traffic vs quality ({model}, {args.servers} servers, "
             "expert model)", "",
             f"{naive['tokens']} eval tokens ({args.samples} x {args.seq_len}, forward calls of {args.batch} "
             f"sequences) through `deploy(..., simulate=True)` (same outputs and counters as the gloo run); experts "
             f"RTN {args.bits}-bit; shard's expert placement (affinity + replicas, balance `{args.balance}`"
             + (f", `--home-replicas {args.home_replicas}`: a home copy of each MoE layer's {args.home_replicas} most "
                "used experts, " + (f"those experts stored at {args.home_bits} bits ({args.home_quant}) everywhere, "
                                    if args.home_bits else "")
                + ("at equal memory" if not extra else f"home memory +{extra / 2**20:.2f} MiB "
                   "beyond the equal share") if args.home_replicas else "") +
             f"), the home holds {local:.0%} of the experts. Lossless round trips/token replayed on the float model's "
             f"routing of the same text: {replayed['placement']:.2f} on this placement, {replayed['default']:.2f} on "
             "shard's default expert placement (no home replicas, equal memory). Full float32 model perplexity "
             f"{full_ppl:.3f}, lossless "
             f"deployment {lossless['ppl']:.3f}, shard's default expert placement at uniform {args.bits} bits, "
             f"lossless: {base['ppl']:.3f}, {base['round_trips_per_token']:.2f} round trips/token, "
             f"{base['decode_round_trips']:.2f} decode. Δppl: against the lossless deployment of this placement (the "
             "policy's own cost); 'vs default' against the default placement's lossless deployment (the policy and "
             "any low-bit home experts); 'vs full' against the float32 model. Round trips/token: remote token x "
             "layer pairs per token (= round "
             "trips per decoded token at batch 1 for per-token policies); decode rt: measured through the runtime, "
             f"{args.decode_prompts} prompts x {args.decode_tokens - 1} decode steps at batch 1. Modeled decode "
             "time per token (execution/timing.py) = compute on the critical path (profile_compute: the compute "
             f"profile measured here, {1e3 * (profile.head_seconds + sum(profile.layer_seconds)):.2f} ms per decode "
             "step on one thread, spread over the servers by the decode steps' pairs and requests; same machine for "
             "every server) + hops x latency + bytes / rate (lan 1 Gbit/s 0.5 ms, wan 100 Mbit/s 5 ms); columns "
             "'compute ms' and the totals. Pipeline model (shard's all-servers pipeline, decoded the same way): "
             f"{pipe['decode_round_trips']:.2f} round trips/token, compute {pipe['compute_ms']:.2f} ms, total "
             f"{pipe['ms_lan']:.2f} ms lan, {pipe['ms_wan']:.2f} ms wan.", "",
             *([f"Home copies (curve `copies`, `localize:copies=true`): {args.copies['copied']} of the "
                f"{args.copies['remote_experts']} remote experts at {args.copies_bits} bits ({args.copies_quant}), "
                "chosen by calibration routing mass per byte, held by the home **in addition** to its share: "
                f"{args.copies['bytes']} bytes = {args.copies['bytes'] / args.copies['server_expert_bytes']:.1%} of "
                f"a server's expert bytes (mean {args.copies['server_expert_bytes']:.0f}; the home's own experts "
                f"{args.copies['home_expert_bytes']:.0f}). Row label `copies T / C`: localize threshold T (weight of "
                "remote pairs without a copy), copy_threshold C (weight computed with copies).", ""]
               if getattr(args, "copies", None) and not getattr(args, "high_shares", ()) else []),
             *(["Mixed-bit copies (`--copies-high-bits`): within the same budget, the hottest remote experts "
                f"(calibration routing mass per byte) at {args.copies_high_bits} bits (RTN) on a share S of the "
                f"budget, then the rest at {args.copies_bits} bits; label `copies [hi S] T / C`: " + "; ".join(
                    f"S={s:g}: {v['copied_high']} at {args.copies_high_bits} + {v['copied'] - v['copied_high']} at "
                    f"{args.copies_bits} bits, {v['bytes']} bytes" for s, v in args.copies_variants.items()), ""]
               if getattr(args, "high_shares", ()) else []),
             "| policy | Δppl % | vs default % | vs full % | KL | bytes/token | vs naive | batch-1 bytes/token | "
             "round trips/token | vs lossless | vs default placement | decode rt/token | decode vs default | "
             "compute ms | lan ms/token | wan ms/token | pruned / substituted / fused / copy pairs per token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['dppl']:+.2f} | {r['dppl_default']:+.2f} | {r['dppl_full']:+.2f} | "
                     f"{r['kl']:.4f} | "
                     f"{r['bytes_per_token']:.0f} | {r['bytes_vs_naive']:.1%} | {r['batch1_bytes_per_token']:.0f} | "
                     f"{r['round_trips_per_token']:.2f} | {r['round_trips_vs_lossless']:.1%} | "
                     f"{r['round_trips_vs_default']:.1%} | {r['decode_round_trips']:.2f} | "
                     f"{r['decode_round_trips_vs_default']:.1%} | {r['compute_ms']:.2f} | {r['ms_lan']:.2f} | "
                     f"{r['ms_wan']:.2f} | "
                     f"{r['pruned_pairs']:.2f} / {r['substituted_pairs']:.2f} / {r['fused_rows']:.2f} / "
                     f"{r.get('copy_pairs', 0):.2f} |")
    lines += ["", "Specs (`--tokens` syntax):", ""] + [f"- {r['label']}: `{r['spec']}`" for r in results]
    beats = {n: min(r[f"ms_{n}"] for r in ok) for n in ("lan", "wan")}
    lines += ["", "Goals at Δppl <= 1 % (against this placement's and the default placement's lossless run): "
              f"fewest bytes {best_bytes['bytes_vs_naive']:.1%} of naive "
              f"({best_bytes['label']}; goal <= 25 %: {'met' if best_bytes['bytes_vs_naive'] <= 0.25 else 'NOT met'}); "
              f"fewest round trips {best_rt['round_trips_vs_lossless']:.1%} of lossless ({best_rt['label']}, "
              f"Δppl {best_rt['dppl']:+.2f} %; goal <= 50 %: "
              f"{'met' if best_rt['round_trips_vs_lossless'] <= 0.5 else 'NOT met'}; "
              f"{best_rt['round_trips_vs_default']:.1%} of the default placement's lossless round trips); fewest "
              f"against the default placement: {best_rtd['round_trips_vs_default']:.1%} ({best_rtd['label']}, Δppl vs "
              f"default {best_rtd['dppl_default']:+.2f} %; decode {best_rtd['decode_round_trips_vs_default']:.1%}).",
              "Best configuration at Δppl <= 1 % vs the pipeline model (modeled ms per decoded token, compute + "
              "network): " +
              ", ".join(f"{n} {beats[n]:.2f} vs {pipe[f'ms_{n}']:.2f} "
                        f"({'expert model faster' if beats[n] < pipe[f'ms_{n}'] else 'pipeline faster'})"
                        for n in ("lan", "wan")),
              "", f"({seconds:.0f}s: `nice .venv/bin/python eval/bench_tokens.py {' '.join(sys.argv[1:])}`)"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"full_ppl": full_ppl, "pipeline": pipe, "args": vars(args),
                                                       "home_extra_bytes": extra, "replayed_round_trips": replayed,
                                                       "home_copies": args.copies,
                                                       "default_lossless": base,
                                                       "compute_profile": profile.to_json(),
                                                       "results": results}, indent=1))
    plot(results, out, args.name)
    if not quiet:
        print("\n".join(lines))


def plot(results, out: Path, name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = next((r for r in results if r["spec"] == "int8"), results[0])
    for key, label, fname in (("bytes_vs_naive", "cross-server bytes / naive per-(token, expert) bf16", "bytes"),
                              ("round_trips_per_token", "round trips per decoded token (batch 1)", "rtt")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = {}
        for r in results:
            curves.setdefault(r["curve"], []).append(r)
        for curve, rows in curves.items():
            rows = rows if curve in ("baseline", "combined") else [start] + rows  # curves start at send once+int8
            if key == "bytes_vs_naive":
                rows = [r for r in rows if r[key] > 0]  # log axis: nothing sent at all is off the plot
            style = "o" if curve in ("baseline", "combined") else "o-"
            ax.plot([r["dppl"] for r in rows], [r[key] for r in rows], style, label=curve)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        if key == "bytes_vs_naive":
            ax.set_yscale("log")
        ax.set_xlim(min(r["dppl"] for r in results) - 0.3, min(max(r["dppl"] for r in results), 10.0) + 0.3)
        ax.set_xlabel("Δ perplexity % vs the lossless deployment (points beyond +10 % off the plot)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}_{fname}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
