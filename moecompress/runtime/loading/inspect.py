"""`moecompress inspect DIR`: per-layer bits and bytes of a checkpoint, read from its headers (no model load)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from torch import nn

from moecompress.format.files import weight_files
from moecompress.format.headers import ALL_DTYPES, read_header
from moecompress.format.spec import read_spec
from moecompress.runtime.experts.packed_group import PackedGroup



def tensor_table(directory: str | Path) -> dict[str, tuple[list[int], int]]:
    """Shape and bytes of every stored tensor, from the safetensors headers."""
    directory, out = Path(directory), {}
    for name in weight_files(directory):
        for key, header in read_header(directory / name).items():  # checked headers: a damaged file is an error
            out[key] = (list(header.shape), math.prod(header.shape) * ALL_DTYPES[header.dtype])
    return out


def checkpoint_report(directory: str | Path) -> dict:
    """Per MoE layer: experts held, bits histogram, bytes; totals against the same weights in bf16."""
    spec = read_spec(directory)
    table = tensor_table(directory)
    sizes = {k: b for k, (_, b) in table.items()}
    layers = []
    expert_bytes = expert_bf16 = 0
    for path, es in spec.experts.items():
        prefix = path + "."
        stored = sum(b for k, b in sizes.items() if k.startswith(prefix))
        bf16 = 0
        hist: Counter = Counter()
        weights = 0
        bit_weight = 0
        for proj, by_bits in es.groups.items():
            for bits, ids in by_bits.items():
                key = f"{path}.{proj}.b{bits}." + ("weight" if bits == 16 else "scales")
                if key not in table:
                    continue
                shape = table[key][0]
                n, out = shape[0], shape[1]
                in_f = shape[2] if bits == 16 else shape[2] * spec.group_size
                bf16 += n * out * in_f * 2
                hist[bits] += n
                weights += n * out * in_f
                bit_weight += n * out * in_f * bits
        layers.append({"path": path, "experts_held": len(es.held(next(iter(es.groups)))) if es.groups else 0,
                       "num_experts": es.num_experts, "bits": dict(sorted(hist.items())),
                       "avg_bits": bit_weight / weights if weights else 0.0, "bytes": stored, "bf16_bytes": bf16})
        expert_bytes += stored
        expert_bf16 += bf16
    total = sum(sizes.values())
    return {"directory": str(directory), "group_size": spec.group_size, "symmetric": spec.symmetric,
            "layers": layers, "linears": spec.linears, "expert_bytes": expert_bytes, "expert_bf16_bytes": expert_bf16,
            "total_bytes": total, "total_bf16_bytes": total - expert_bytes + expert_bf16}


def resident_bytes(model: nn.Module) -> int:
    """Bytes a loaded model holds: parameters and buffers (shared storage counted once) plus kernel layouts."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, PackedGroup) and m._int4 is not None:
            tensors += [t for pair in m._int4 for t in pair]
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes() == 0:  # an empty tensor mmapped from a file may share its data_ptr with the next tensor
            continue
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def format_report(report: dict) -> str:
    mb = 1 / 2**20
    lines = [f"checkpoint {report['directory']}  group_size={report['group_size']} symmetric={report['symmetric']}",
             "| layer | experts held | bits (count of expert projections) | avg bits | MB | bf16 MB |",
             "|---|---|---|---|---|---|"]
    for lay in report["layers"]:
        bits = " ".join(f"{b}b:{n}" for b, n in lay["bits"].items())
        lines.append(f"| {lay['path']} | {lay['experts_held']}/{lay['num_experts']} | {bits} | {lay['avg_bits']:.2f} "
                     f"| {lay['bytes'] * mb:.2f} | {lay['bf16_bytes'] * mb:.2f} |")
    lines.append(f"experts: {report['expert_bytes'] * mb:.2f} MB vs {report['expert_bf16_bytes'] * mb:.2f} MB bf16; "
                 f"total: {report['total_bytes'] * mb:.2f} MB vs {report['total_bf16_bytes'] * mb:.2f} MB bf16 "
                 f"({report['total_bytes'] / max(report['total_bf16_bytes'], 1):.1%})")
    if report["linears"]:
        lines.append("quantized dense linears: " + ", ".join(f"{p}={b}b" for p, b in report["linears"].items()))
    return "\n".join(lines)
