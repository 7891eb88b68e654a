"""Per-server bundles: an exported checkpoint split by a Placement, one loadable directory per server.

A bundle holds the replicated (non-expert) weights and, for every MoE layer, only the rows of the expert groups its
server holds; its config.json lists exactly those experts, so `from_pretrained` loads it on its own. Only the format
layer is used: tensors are sliced from the checkpoint's safetensors, never re-quantized.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.format.files import PLACEMENT_FILE, atomic_dir, verify_files, weight_files, write_manifest
from moecompress.format.spec import ExpertsSpec, FormatSpec

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def read_spec_and_config(checkpoint: Path) -> tuple[dict, FormatSpec]:
    config = json.loads((checkpoint / "config.json").read_text())
    if "quantization_config" not in config:
        raise MoecompressError(f"{checkpoint} is not a moecompress checkpoint (run `moecompress quantize` first)")
    return config, FormatSpec.from_dict(config["quantization_config"])


def server_spec(spec: FormatSpec, placement: Placement, server: int) -> FormatSpec:
    """The FormatSpec of one server's bundle: each layer's groups restricted to the experts that server holds."""
    experts = {}
    for layer, (path, es) in enumerate(spec.experts.items()):
        held = {e for e in range(es.num_experts) if server in placement.servers_of(layer, e)}
        groups = {proj: {b: tuple(e for e in ids if e in held) for b, ids in by_bits.items()}
                  for proj, by_bits in es.groups.items()}
        groups = {proj: {b: ids for b, ids in by_bits.items() if ids} for proj, by_bits in groups.items()}
        experts[path] = ExpertsSpec(num_experts=es.num_experts, groups=groups)
    return FormatSpec(group_size=spec.group_size, symmetric=spec.symmetric, experts=experts, linears=spec.linears)


def split_group_key(key: str, spec: FormatSpec):
    """'P.proj.bB.name' -> (P, proj, B, name) for group tensors; None for any other tensor."""
    for path in spec.experts:
        if key.startswith(path + "."):
            parts = key[len(path) + 1:].split(".")
            if len(parts) == 3 and parts[1].startswith("b") and parts[1][1:].isdigit():
                return path, parts[0], int(parts[1][1:]), parts[2]
    return None


def bundle_tensors(checkpoint: Path, spec: FormatSpec, sub: FormatSpec, with_dense: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name in weight_files(checkpoint):
        with safe_open(checkpoint / name, "pt") as f:
            for key in f.keys():
                group = split_group_key(key, spec)
                if group is None:
                    is_marker = any(key.startswith(p + ".") for p in spec.experts)
                    if with_dense or is_marker:
                        out[key] = f.get_tensor(key)
                    continue
                path, proj, bits, _ = group
                ids = spec.experts[path].groups[proj][bits]
                keep = sub.experts[path].groups.get(proj, {}).get(bits, ())
                if keep:
                    rows = [ids.index(e) for e in keep]
                    out[key] = f.get_tensor(key)[rows].contiguous()
    return out


def write_bundles(checkpoint: str | Path, placement: Placement, out: str | Path, traffic: dict | None = None,
                  overwrite: bool = False) -> Placement:
    """Write OUT/server-K/ for every server and OUT/placement.json (with every file's sha256); atomically."""
    checkpoint, out = Path(checkpoint), Path(out)
    verify_files(checkpoint)
    config, spec = read_spec_and_config(checkpoint)
    if placement.num_layers != len(spec.experts):
        raise MoecompressError(f"placement has {placement.num_layers} MoE layers, the checkpoint {len(spec.experts)}")
    with atomic_dir(out, overwrite) as tmp:
        files = {}
        for server in range(placement.num_servers):
            sub = server_spec(spec, placement, server)
            bundle = tmp / f"server-{server}"
            bundle.mkdir()
            tensors = bundle_tensors(checkpoint, spec, sub, server in placement.dense_servers)
            save_file(tensors, bundle / "model.safetensors", metadata={"format": "pt"})
            (bundle / "config.json").write_text(json.dumps({**config, "quantization_config": sub.to_dict()}, indent=2))
            for side in SIDE_FILES:
                if (checkpoint / side).exists():
                    shutil.copy2(checkpoint / side, bundle / side)
            manifest = write_manifest(bundle, {"format": "moecompress", "server": server,
                                               "num_servers": placement.num_servers})
            files[server] = {f"server-{server}/{n}": v["sha256"] for n, v in manifest["files"].items()}
        placement = Placement(**{**placement.__dict__, "files": files})
        doc = {**placement.to_json(), "checkpoint": str(checkpoint), "experts_paths": list(spec.experts)}
        if traffic is not None:
            doc["traffic"] = traffic
        (tmp / PLACEMENT_FILE).write_text(json.dumps(doc, indent=1))
    return placement
