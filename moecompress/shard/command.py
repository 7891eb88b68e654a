"""`moecompress shard`: place a checkpoint's experts on servers and write one bundle per server."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.replay import Call, decode_calls, replay
from moecompress.format.copies import copy_bytes
from moecompress.format.files import verify_files, weight_files
from moecompress.format.sizes import DTYPE_BYTES
from moecompress.shard.bundles import (
    decoder_layer_of,
    moe_decoder_layers,
    read_spec_and_config,
    split_group_key,
    write_bundles,
)
from moecompress.execution.timing import parse_profiles
from moecompress.shard.choose import choose_placement, format_choice, synthetic_trace
from moecompress.shard.compare import AUTO, check_method, mode_of, place, traffic_row
from moecompress.shard.layers import LayerSizes
from moecompress.shard.routing import RoutingStats, RoutingTrace
from moecompress.shard.spec import parse_servers


def routing_stats(stats: CalibrationStats) -> RoutingStats:
    return RoutingStats(tokens=stats.tokens.numpy(), coact=stats.coactivation.numpy(), paths=stats.paths.numpy(),
                        num_tokens=stats.num_tokens, top_k=stats.top_k)


def routing_trace(stats: CalibrationStats) -> RoutingTrace:
    if stats.trace_indices is None:
        raise MoecompressError("these calibration stats hold no routing trace; calibrate with --trace to replay it")
    return RoutingTrace(experts=stats.trace_indices.numpy(), weights=stats.trace_weights.numpy(),
                        num_experts=stats.num_experts)


def checkpoint_sizes(checkpoint: Path) -> tuple[np.ndarray, int]:
    """Exact stored bytes of every expert ([L, E]: its rows of every group tensor) and of everything else."""
    sizes = checkpoint_layer_sizes(checkpoint)
    return sizes.expert_bytes, sizes.dense_bytes


def checkpoint_layer_sizes(checkpoint: Path) -> LayerSizes:
    """Stored bytes by layer: every expert, every decoder layer's other tensors, and the rest (embeddings, head)."""
    from safetensors import safe_open

    config, spec = read_spec_and_config(Path(checkpoint))
    paths = list(spec.experts)
    num_experts = max((es.num_experts for es in spec.experts.values()), default=0)  # 0: a bundle holding none
    expert_bytes = np.zeros((len(paths), num_experts), dtype=np.int64)
    moe = moe_decoder_layers(spec)
    num_decoder = int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
                      or max(moe, default=-1) + 1)
    layer_dense = np.zeros(num_decoder, dtype=np.int64)
    head = 0
    for name in weight_files(Path(checkpoint)):
        with safe_open(Path(checkpoint) / name, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                nbytes = int(np.prod(t.get_shape(), dtype=np.int64)) * DTYPE_BYTES[t.get_dtype()]
                group = split_group_key(key, spec)
                if group is None:
                    layer = decoder_layer_of(key, spec)
                    if layer is None:
                        head += nbytes
                    else:
                        layer_dense[layer] += nbytes
                    continue
                path, proj, bits, _ = group
                ids = spec.experts[path].groups[proj][bits]
                expert_bytes[paths.index(path), list(ids)] += nbytes // len(ids)
    for (path, e), nbytes in copy_bytes(checkpoint, spec).items():  # an expert's low-bit copy goes with it
        expert_bytes[paths.index(path), e] += nbytes
    return LayerSizes(expert_bytes=expert_bytes, moe_decoder_layers=moe,
                      layer_dense_bytes=tuple(int(b) for b in layer_dense), head_bytes=int(head))


def replay_report(placement: Placement, trace: RoutingTrace, seq_len: int, hidden_size: int, payload_bytes: int,
                  moe_layers) -> dict:
    """The eval trace replayed as prefills of `seq_len` tokens and as single-sequence decoding of the same text."""
    T, report = trace.num_tokens, {}
    chunks = [min(seq_len, T - i) for i in range(0, T, seq_len)]
    for name, calls in (("prefill", [Call(1, n, n) for n in chunks]),
                        ("decode", [c for n in chunks for c in decode_calls(n, 1)])):
        counters = replay(placement, trace.experts, calls, hidden_size, payload_bytes, moe_layers)
        report[name] = {**traffic_row(placement, counters, moe_layers), "calls": counters.calls,
                        "tokens": counters.tokens, "messages": int(counters.messages.sum()),
                        "bytes": int(counters.bytes.sum()), "hops": int(counters.hops.sum())}
    return report


def run_shard_command(model: str, stats: str, servers: str, out: str, method: str | None = None,
                      mode: str = AUTO, balance: str = "total", replicate: bool = True,
                      eval_stats: str | None = None, replicate_dense: bool = True, balance_epsilon: float = 0.1,
                      payload_bytes: int = 2, link: str | None = None, batch: int = 1,
                      compute_profile: str | None = None,
                      home_replicas: int = 0, home_bits: int | None = None, home_copies: int | None = None,
                      home_copies_budget: float = 1.0, home_copies_from: str | None = None,
                      home_copies_high: int | None = None, home_copies_high_share: float | None = None,
                      home_copies_high_from: str | None = None):
    """mode "auto" (default): with --method, that method's execution model; without, every method of both models,
    the fastest by modeled decode time on `link` for `batch` sequences (compute from `compute_profile`, a
    `moecompress profile` file measured on the servers, else measured here on this machine). `link` None: planned
    for LAN and WAN together (the candidate least slower than the best baseline on either, shard/choose.py);
    'a+b': for those links. `home_replicas` > 0:
    the expert model with a home copy of each MoE layer's that many hottest experts, in the same memory
    (shard/home.py). `home_bits` B: the home copies are the experts `model` stores at B bits (a checkpoint quantized
    with shard/home.home_bit_plan), `home_replicas` (if given) of them per layer. `home_copies` B: every home's
    bundle also gets low-bit copies of remote experts (B bits, `home_copies_budget` x the mean server's expert bytes,
    from the checkpoint's own copies or `home_copies_from`; shard/home_copies.py) for `localize:copies=true`;
    `home_copies_high` H: mixed-bit copies, the hottest at H bits on `home_copies_high_share` (default 0.5) of the
    budget (from `home_copies_high_from`, else the checkpoint's copies or experts at H bits), the rest at B."""
    if home_bits is not None:
        from moecompress.artifacts.bit_plan import check_bits

        check_bits(home_bits, "--home-bits")  # before any file is read
        if mode == "pipeline":
            raise MoecompressError("--home-bits is for the expert model's home copies; the pipeline model has none")
    copies = None
    if home_copies is None and (home_copies_high is not None or home_copies_high_share is not None
                                or home_copies_high_from is not None):
        raise MoecompressError("--home-copies-high* make the home copies mixed-bit: add --home-copies BITS (the low "
                               "bits)")
    if home_copies is not None:
        from moecompress.shard.home_copies import HomeCopies

        copies = HomeCopies(home_copies, home_copies_budget, home_copies_from, home_copies_high,
                            home_copies_high_share, home_copies_high_from)  # checked before any file is read
        if mode == "pipeline":
            raise MoecompressError("--home-copies is for the expert model's homes; the pipeline model has none")
    if (home_replicas or home_bits is not None or copies is not None) and mode == AUTO:
        mode = "expert"  # home replicas exist only in the expert model
    if mode == AUTO and method is not None:
        mode = mode_of(method)
    if mode != AUTO:
        method = check_method(mode, method)  # before any file is read
    link_profile = parse_profiles(link)  # before any file is read
    checkpoint = Path(model)
    verify_files(checkpoint)  # every file against its manifest before any size is read from it
    config, _ = read_spec_and_config(checkpoint)
    calib = CalibrationStats.load(stats)
    rstats = routing_stats(calib)
    sizes = checkpoint_layer_sizes(checkpoint)
    spec = parse_servers(servers, replicate_dense=replicate_dense, balance_epsilon=balance_epsilon,
                         balance=balance, mode="expert" if mode == AUTO else mode)
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    traffic = {"payload_bytes": payload_bytes}
    if mode == AUTO:
        placement, traffic["choice"] = auto_placement(checkpoint, calib, rstats, sizes, spec, hidden, payload_bytes,
                                                      link_profile, batch, compute_profile, eval_stats, replicate)
        print(format_choice(traffic["choice"]))
    elif home_replicas or home_bits is not None:
        from moecompress.shard.home import experts_at_bits, place_home_replicas

        hot = None
        if home_bits is not None:
            _, fspec = read_spec_and_config(checkpoint)
            hot = experts_at_bits(fspec, list(fspec.experts), home_bits, home_replicas)  # sizes' layer order
        placement = place_home_replicas(rstats, sizes, spec, method, home_replicas or len(hot[0]), replicate, hot=hot)
    else:
        placement = place(rstats, sizes, spec, method, replicate)
    if eval_stats:
        held_out = CalibrationStats.load(eval_stats)
        traffic["replay"] = replay_report(placement, routing_trace(held_out), held_out.seq_len, hidden,
                                          payload_bytes, sizes.moe_decoder_layers)
    from moecompress.shard.home import coactivation_similarity

    extra = None
    if copies is not None:
        from moecompress.shard.home_copies import choose_for_homes, copy_source, high_copy_source, write_home_copies

        source = copy_source(checkpoint, copies)
        high = high_copy_source(checkpoint, copies) if copies.high_bits is not None else None
        chosen = choose_for_homes(placement, calib.mass.numpy(), source, copies.budget, high, copies.share)
        extra = lambda server, bundle: (write_home_copies(bundle, chosen[server], server)  # noqa: E731
                                        if server in chosen else {})
        traffic["home_copies"] = {"bits": copies.bits, "budget": copies.budget, "homes": {
            str(h): copies_row(parts) for h, parts in chosen.items()}}
        if high is not None:
            traffic["home_copies"]["high"] = {"bits": high.bits, "share": copies.share}
    placement = write_bundles(checkpoint, placement, out, traffic=traffic, verify=False,  # verified above
                              similarity=coactivation_similarity(rstats) if placement.mode == "expert" else None,
                              extra=extra)
    from moecompress.shard.inspect import format_placement

    print(format_placement(out))
    return placement


def copies_row(parts) -> dict:
    """A home's copies in the traffic report: experts and bytes (and those of the high-bit part, when mixed)."""
    from moecompress.shard.home import copies_bytes

    counts = [(sum(map(len, ids)), copies_bytes(src.expert_bytes, ids)) for src, ids in parts]
    row = {"experts": sum(c for c, _ in counts), "bytes": sum(b for _, b in counts)}
    if len(parts) > 1:
        row.update(high_experts=counts[0][0], high_bytes=counts[0][1])
    return row


def auto_placement(checkpoint: Path, calib: CalibrationStats, rstats: RoutingStats, sizes: LayerSizes, spec,
                   hidden: int, payload_bytes: int, link, batch: int, compute_profile: str | None,
                   eval_stats: str | None, replicate: bool):
    """--mode auto: the routing trace of the calibration (else of --eval-stats, else drawn from the counts) and the
    compute profile (from the file, else measured here) decide between every placement of both models."""
    import torch

    from moecompress.shard.profile import load_profile, measure_profile

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(payload_bytes, torch.bfloat16)  # the payloads' dtype
    if compute_profile:
        profile = load_profile(compute_profile, batch)
    else:
        profile = measure_profile(checkpoint, batch=batch, context=calib.seq_len, reps=3, dtype=dtype)
        profile = replace(profile, source="measured on this machine: " + profile.source)
    measured = getattr(torch, profile.dtype, None) if profile.dtype else None
    if isinstance(measured, torch.dtype) and measured.itemsize != payload_bytes:
        print(f"note: the compute profile was measured in {profile.dtype}, the payloads are counted at "
              f"{payload_bytes} bytes per value; measure it in the deployment's dtype "
              "(`moecompress profile --dtype ...`)")
    seq_len = calib.seq_len
    if calib.trace_indices is not None:
        experts, source = calib.trace_indices.numpy(), "calibration trace"
    elif eval_stats and CalibrationStats.load(eval_stats).trace_indices is not None:
        held = CalibrationStats.load(eval_stats)
        experts, source, seq_len = held.trace_indices.numpy(), "--eval-stats trace", held.seq_len
    else:
        experts, source = synthetic_trace(rstats), "drawn from the calibration counts (no trace recorded)"
    placement, report = choose_placement(rstats, sizes, spec, experts.astype(np.int64), seq_len, hidden,
                                         payload_bytes, profile, link, replicate)
    report["trace"] = source
    return placement, report
