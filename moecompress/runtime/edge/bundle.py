"""What one rank knows about its deployment: its own bundle's description, checked before any exchange.

A rank reads only OUT/placement.json and OUT/server-K/ (its own bundle): bundle.json when the bundle has one (written
by `moecompress shard`), else the same facts derived from placement.json and the bundle's manifest. Every refusal
(missing or foreign bundle, a placement hash that differs, a world size that is not the placement's, altered files)
is one MoecompressError line, raised before the rank joins any exchange.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.execution.routing import Mode
from moecompress.format.files import MANIFEST, PLACEMENT_FILE, sha256_file, verify_files
from moecompress.format.spec import read_spec
from moecompress.runtime.loading.load import BUNDLE_FILE


@dataclass(frozen=True)
class BundleInfo:
    out: Path  # the deployment directory (holds placement.json and server-K/)
    server: int
    num_servers: int
    mode: Mode
    home: int
    assignment: tuple[tuple[tuple[int, ...], ...], ...]  # [MoE layer][expert] -> servers, primary first
    dense_servers: tuple[int, ...]
    layer_servers: tuple[int, ...]  # pipeline: server of every decoder layer; () in the expert model
    holds: str  # "full" | "experts" | "layers"
    placement_sha256: str
    experts_paths: tuple[str, ...]  # module path of every MoE layer's experts, in layer order
    verify: bool = True  # files checked against their manifests when read (this bundle's, its home copies')

    @property
    def directory(self) -> Path:
        return self.out / f"server-{self.server}"

    @property
    def stages(self) -> tuple[int, ...]:
        """Pipeline: servers holding layers, in order."""
        return tuple(dict.fromkeys(self.layer_servers))


def placement_doc(out: str | Path) -> tuple[dict, str]:
    """(placement.json's content, its sha256)."""
    path = Path(out) / PLACEMENT_FILE
    if not path.exists():
        raise MoecompressError(f"{out} has no {PLACEMENT_FILE}; pass the output directory of `moecompress shard`")
    return json.loads(path.read_text()), sha256_file(path)


def read_bundle(out: str | Path, server: int, world_size: int | None = None, verify: bool = True) -> BundleInfo:
    """Server `server`'s description of the deployment in `out`, after every check a rank makes before exchanging."""
    out = Path(out)
    doc, digest = placement_doc(out)
    num_servers = len(doc["memory_bytes"])
    if world_size is not None and world_size != num_servers:
        raise MoecompressError(f"the placement in {out} has {num_servers} servers but {world_size} processes were "
                               f"started; start exactly {num_servers}")
    if not 0 <= server < num_servers:
        raise MoecompressError(f"rank {server} is not a server of the placement in {out} (0..{num_servers - 1})")
    directory = out / f"server-{server}"
    if not directory.is_dir():
        raise MoecompressError(f"bundle {directory} is missing; copy server {server}'s bundle from the shard output")
    described = _described(directory, doc, server)
    if int(described.get("server", -1)) != server:
        raise MoecompressError(f"{directory} is server {described.get('server')}'s bundle, not server {server}'s; "
                               "copy the right bundle")
    if described["placement_sha256"] != digest:
        raise MoecompressError(f"{directory} was written for another placement (its placement sha256 differs from "
                               f"{out / PLACEMENT_FILE}); copy the bundles and placement.json of one shard output")
    if int(described["num_servers"]) != num_servers:
        raise MoecompressError(f"{directory} belongs to a {described['num_servers']}-server deployment, the placement "
                               f"has {num_servers}")
    if verify:
        verify_files(directory)
    spec = read_spec(directory)
    mode = Mode(described.get("mode", "expert"))
    dense = tuple(int(s) for s in described["dense_servers"])
    layer_servers = tuple(int(s) for s in described.get("layer_servers") or ())
    home = described.get("home")
    home = int(home) if home is not None else (layer_servers[0] if layer_servers else dense[0])
    return BundleInfo(
        out=out, server=server, num_servers=num_servers, mode=mode, home=home,
        assignment=tuple(tuple(tuple(int(s) for s in c) for c in layer) for layer in described["assignment"]),
        dense_servers=dense, layer_servers=layer_servers, holds=str(described["holds"]),
        placement_sha256=digest, experts_paths=tuple(doc.get("experts_paths") or spec.experts), verify=verify,
    )


def _described(directory: Path, doc: dict, server: int) -> dict:
    """bundle.json, or (bundles written before it) the same keys derived from placement.json and the manifest."""
    if (directory / BUNDLE_FILE).exists():
        return json.loads((directory / BUNDLE_FILE).read_text())
    if not (directory / MANIFEST).exists():
        raise MoecompressError(f"{directory} has neither {BUNDLE_FILE} nor {MANIFEST}; it is not a server bundle")
    manifest = json.loads((directory / MANIFEST).read_text())
    listed = {int(s) for s in doc.get("files", {})}
    if server not in listed:
        raise MoecompressError(f"{directory} is not listed in the placement's files; re-run `moecompress shard`")
    dense = [int(s) for s in doc["dense_servers"]]
    expected = doc["files"][str(server)]
    for rel, sha in expected.items():  # the files this placement was written with
        if not (directory.parent / rel).exists() or sha256_file(directory.parent / rel) != sha:
            raise MoecompressError(f"{directory.parent / rel} differs from the placement's sha256: the bundle was "
                                   "altered or belongs to another placement")
    return {
        "server": int(manifest.get("server", server)),
        "num_servers": int(manifest.get("num_servers", len(doc["memory_bytes"]))),
        "mode": doc.get("mode", "expert"),
        "home": doc.get("home"),
        "assignment": doc["assignment"],
        "dense_servers": dense,
        "layer_servers": doc.get("layer_servers") or [],
        "holds": "full" if server in dense else "experts",
        "placement_sha256": sha256_file(directory.parent / PLACEMENT_FILE),
    }
