"""`moecompress shard`: place a checkpoint's experts on servers and write one bundle per server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.errors import MoecompressError
from moecompress.format.sizes import DTYPE_BYTES
from moecompress.format.files import weight_files
from moecompress.shard.bundles import read_spec_and_config, split_group_key, write_bundles
from moecompress.shard.compare import METHODS
from moecompress.shard.replicate import replicate_hot
from moecompress.shard.routing import RoutingStats, RoutingTrace
from moecompress.shard.spec import ServerSpec, parse_servers
from moecompress.shard.traffic import estimate_traffic, expected_traffic


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
    from safetensors import safe_open

    _, spec = read_spec_and_config(checkpoint)
    paths = list(spec.experts)
    expert_bytes = np.zeros((len(paths), max(es.num_experts for es in spec.experts.values())), dtype=np.int64)
    dense = 0
    for name in weight_files(checkpoint):
        with safe_open(checkpoint / name, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                nbytes = int(np.prod(t.get_shape(), dtype=np.int64)) * DTYPE_BYTES[t.get_dtype()]
                group = split_group_key(key, spec)
                if group is None:
                    dense += nbytes
                    continue
                path, proj, bits, _ = group
                ids = spec.experts[path].groups[proj][bits]
                expert_bytes[paths.index(path), list(ids)] += nbytes // len(ids)
    return expert_bytes, dense


def place(stats: RoutingStats, expert_bytes: np.ndarray, dense_bytes: int, spec: ServerSpec, method: str,
          replicate: bool):
    if method not in METHODS:
        raise MoecompressError(f"placement method {method!r}; allowed: {', '.join(METHODS)}")
    placement = METHODS[method](stats, expert_bytes, dense_bytes, spec)
    return replicate_hot(placement, stats, spec) if replicate else placement


def run_shard_command(model: str, stats: str, servers: str, out: str, method: str = "affinity",
                      replicate: bool = True, eval_stats: str | None = None, replicate_dense: bool = True,
                      balance_epsilon: float = 0.1, payload_bytes: int = 2):
    checkpoint = Path(model)
    config, _ = read_spec_and_config(checkpoint)
    calib = CalibrationStats.load(stats)
    rstats = routing_stats(calib)
    expert_bytes, dense_bytes = checkpoint_sizes(checkpoint)
    spec = parse_servers(servers, replicate_dense=replicate_dense, balance_epsilon=balance_epsilon)
    placement = place(rstats, expert_bytes, dense_bytes, spec, method, replicate)
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    traffic = {"estimate_bytes_per_token": estimate_traffic(placement, rstats, hidden, payload_bytes),
               "payload_bytes": payload_bytes}
    if eval_stats:
        report = expected_traffic(placement, routing_trace(CalibrationStats.load(eval_stats)), hidden, payload_bytes,
                                  spec.link_bandwidth)
        traffic["replay"] = report.to_json()
    placement = write_bundles(checkpoint, placement, out, traffic=traffic)
    from moecompress.shard.inspect import format_placement

    print(format_placement(out))
    return placement
