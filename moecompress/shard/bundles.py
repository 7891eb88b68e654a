"""Per-server bundles: an exported checkpoint split by a Placement, one directory per server.

Expert model: a bundle holds the dense (non-expert) weights when its server is one of `dense_servers` ("full"),
and for every MoE layer only the rows of the expert groups its server holds ("experts" when it has no dense
weights). Pipeline model: server K holds only its decoder layers (their dense weights and experts), and the home
(first stage) also embeddings, final norm and lm_head ("layers"). Each config.json lists exactly the experts held.
Each bundle describes itself in bundle.json (server, mode, home, full assignment, dense and layer servers, what it
holds, the sha256 of placement.json) listed in its manifest; placement.json lists every other bundle file's sha256
(not bundle.json: it holds placement.json's hash). Only the format layer is used: tensors are sliced from the
checkpoint's safetensors, never re-quantized.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.format.files import (
    PLACEMENT_FILE,
    atomic_dir,
    sha256_file,
    verify_files,
    weight_files,
    write_manifest,
)
from moecompress.format.copies import bundle_copies, copies_file
from moecompress.format.spec import ExpertsSpec, FormatSpec
from moecompress.runtime.edge.tokens import SIMILARITY_FILE

BUNDLE_FILE = "bundle.json"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
              "expert_stats.safetensors")  # format/expert_stats.py: copied unchanged, indexed by global expert id


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
        groups = {proj: by_bits for proj, by_bits in groups.items() if by_bits}
        if groups:  # a layer of which the server holds no expert is left out of its spec
            experts[path] = ExpertsSpec(num_experts=es.num_experts, groups=groups, copy_bits=es.copy_bits)
    return FormatSpec(group_size=spec.group_size, symmetric=spec.symmetric, experts=experts, linears=spec.linears)


def split_group_key(key: str, spec: FormatSpec):
    """'P.proj.bB.name' -> (P, proj, B, name) for group tensors; None for any other tensor."""
    for path in spec.experts:
        if key.startswith(path + "."):
            parts = key[len(path) + 1:].split(".")
            if len(parts) == 3 and parts[1].startswith("b") and parts[1][1:].isdigit():
                return path, parts[0], int(parts[1][1:]), parts[2]
    return None


def decoder_layer_of(key: str, spec: FormatSpec) -> int | None:
    """The decoder layer a tensor belongs to ('model.layers.3.self_attn...' -> 3), None for embeddings/norm/head.

    The decoder layers' container is taken from the experts paths (e.g. model.layers.3.mlp.experts)."""
    for path in spec.experts:
        m = re.match(r"^(.*)\.(\d+)\.", path)
        if m:
            km = re.match(rf"^{re.escape(m.group(1))}\.(\d+)\.", key)
            return int(km.group(1)) if km else None
    return None


def moe_decoder_layers(spec: FormatSpec) -> tuple[int, ...]:
    """The decoder layer of every MoE layer, in order."""
    layers = tuple(decoder_layer_of(path + ".", spec) for path in spec.experts)
    if any(d is None for d in layers):
        raise MoecompressError(f"cannot tell the decoder layer of experts paths {list(spec.experts)}")
    return layers


def keeps(key: str, spec: FormatSpec, placement: Placement, server: int) -> bool:
    """Whether `server`'s bundle holds a non-group tensor (dense weight or experts marker)."""
    if placement.mode == "pipeline":
        layer = decoder_layer_of(key, spec)
        return placement.layer_servers[layer] == server if layer is not None else server == placement.home
    is_marker = any(key.startswith(p + ".") for p in spec.experts)
    return is_marker or server in placement.dense_servers


def holds(placement: Placement, server: int) -> str:
    if placement.mode == "pipeline":
        return "layers"
    return "full" if server in placement.dense_servers else "experts"


def bundle_tensors(checkpoint: Path, spec: FormatSpec, sub: FormatSpec, placement: Placement,
                   server: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in weight_files(checkpoint):
        with safe_open(checkpoint / name, "pt") as f:
            for key in f.keys():
                group = split_group_key(key, spec)
                if group is None:
                    if keeps(key, spec, placement, server):
                        out[key] = f.get_tensor(key)
                    continue
                path, proj, bits, _ = group
                ids = spec.experts[path].groups[proj][bits]
                held = sub.experts.get(path)
                keep = held.groups.get(proj, {}).get(bits, ()) if held else ()
                if keep:
                    rows = [ids.index(e) for e in keep]
                    out[key] = f.get_tensor(key)[rows].contiguous()
    return out


def bundle_description(placement: Placement, server: int, placement_sha256: str) -> dict:
    return {
        "server": server,
        "num_servers": placement.num_servers,
        "mode": placement.mode,
        "home": placement.home,
        "assignment": [[list(c) for c in layer] for layer in placement.assignment],
        "dense_servers": list(placement.dense_servers),
        "layer_servers": list(placement.layer_servers),
        "holds": holds(placement, server),
        "placement_sha256": placement_sha256,
    }


def write_bundles(checkpoint: str | Path, placement: Placement, out: str | Path, traffic: dict | None = None,
                  overwrite: bool = False, verify: bool = True, similarity: torch.Tensor | None = None,
                  extra=None) -> Placement:
    """Write OUT/server-K/ for every server and OUT/placement.json (with every file's sha256); atomically.

    `similarity` [MoE layers, experts, experts]: the expert similarity the `substitute` token policy reads, written
    into every expert-model bundle as expert_similarity.safetensors (runtime/edge/tokens.py), listed in its manifest.

    `verify=False` only where the caller has just verified the checkpoint's files (the shard command does, before it
    reads any size), so that they are hashed once. `extra(server, bundle_dir)`: writes more files into a bundle
    (a sub-directory with its own manifest, e.g. the home copies: shard/home_copies.py) and returns {path in the
    bundle: sha256}, which placement.json pins too."""
    checkpoint, out = Path(checkpoint), Path(out)
    if verify:
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
            tensors = bundle_tensors(checkpoint, spec, sub, placement, server)
            save_file(tensors, bundle / "model.safetensors", metadata={"format": "pt"})
            if sub.copy_bits is not None:  # the low-bit copies of the experts it holds (format/copies.py)
                save_file(bundle_copies(checkpoint, spec, sub), copies_file(bundle), metadata={"format": "pt"})
            if similarity is not None and placement.mode == "expert":
                save_file({"similarity": similarity.float().contiguous()}, bundle / SIMILARITY_FILE)
            (bundle / "config.json").write_text(json.dumps({**config, "quantization_config": sub.to_dict()}, indent=2))
            for side in SIDE_FILES:
                if (checkpoint / side).exists():
                    shutil.copy2(checkpoint / side, bundle / side)
            manifest = write_manifest(bundle, {"format": "moecompress", "server": server,
                                               "num_servers": placement.num_servers})
            files[server] = {f"server-{server}/{n}": v["sha256"] for n, v in manifest["files"].items()}
            if extra is not None:
                files[server].update({f"server-{server}/{n}": sha for n, sha in extra(server, bundle).items()})
        placement = Placement(**{**placement.__dict__, "files": files})
        doc = {**placement.to_json(), "checkpoint": str(checkpoint), "experts_paths": list(spec.experts)}
        if traffic is not None:
            doc["traffic"] = traffic
        (tmp / PLACEMENT_FILE).write_text(json.dumps(doc, indent=1))
        digest = sha256_file(tmp / PLACEMENT_FILE)
        for server in range(placement.num_servers):
            bundle = tmp / f"server-{server}"
            (bundle / BUNDLE_FILE).write_text(json.dumps(bundle_description(placement, server, digest), indent=1))
            write_manifest(bundle, {"format": "moecompress", "server": server, "num_servers": placement.num_servers})
    return placement
