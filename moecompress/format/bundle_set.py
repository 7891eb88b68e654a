"""A bundle set (the output of `moecompress shard`): placement.json plus one server-K/ bundle per server.

`verify_bundles` checks it whole before anything is loaded: placement.json parses into a valid Placement (every
field typed, every server id in range), every server has its bundle, every file placement.json lists lies inside
the set and matches its sha256, each bundle passes its own manifest, and each bundle's config.json holds exactly
the experts the placement gives its server -- so no expert is dropped or computed twice -- and its bundle.json
(listed in its manifest) pins placement.json by sha256.
"""
from __future__ import annotations

from pathlib import Path

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.format.files import (
    PLACEMENT_FILE,
    contained_file,
    read_json_object,
    read_manifest,
    refuse_partial,
    sha256_file,
    verify_files,
)
from moecompress.format.spec import FormatSpec

BUNDLE_FILE = "bundle.json"  # a server bundle's description of itself (shard/bundles.py)
PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def read_placement(out: Path) -> tuple[dict, Placement]:
    path = out / PLACEMENT_FILE
    if not path.exists():
        raise MoecompressError(f"{out} has no {PLACEMENT_FILE}; is it the output of `moecompress shard`?")
    doc = read_json_object(path, "placement")
    if not isinstance(doc.get("files"), dict):
        raise MoecompressError(f"{path}: files must map every server to its files' sha256")
    try:
        placement = Placement.from_json(doc)
    except MoecompressError as exc:
        raise MoecompressError(f"{path}: {exc}") from None
    except PARSE_ERRORS as exc:
        raise MoecompressError(f"{path}: malformed placement ({type(exc).__name__}: {exc})") from None
    paths = doc.get("experts_paths")
    if not isinstance(paths, list) or len(paths) != placement.num_layers or not all(isinstance(p, str) for p in paths):
        raise MoecompressError(f"{path}: experts_paths must list one experts module path per MoE layer "
                               f"({placement.num_layers})")
    files = doc.get("files")
    servers = [str(s) for s in range(placement.num_servers)]
    if not isinstance(files, dict) or sorted(files, key=str) != sorted(servers):
        raise MoecompressError(f"{path}: files must list every server {', '.join(servers)} exactly once, "
                               f"got {sorted(map(str, files)) if isinstance(files, dict) else files!r}")
    return doc, placement


def verify_bundles(out: str | Path, checksums: bool = True) -> dict:
    """Check a whole bundle set (see the module docstring); returns placement.json's content."""
    out = Path(out)
    refuse_partial(out)
    doc, placement = read_placement(out)
    digest = sha256_file(out / PLACEMENT_FILE)
    for server in range(placement.num_servers):
        bundle = out / f"server-{server}"
        if not bundle.is_dir() or bundle.is_symlink():
            raise MoecompressError(f"bundle {bundle} is missing (placement.json lists server {server})")
    for server in range(placement.num_servers):
        bundle = out / f"server-{server}"
        entries = doc["files"][str(server)]
        if not isinstance(entries, dict) or not entries:
            raise MoecompressError(f"{out / PLACEMENT_FILE}: files of server {server} must map file paths to sha256")
        for rel, file_sha in entries.items():
            if not isinstance(rel, str) or not rel.startswith(f"server-{server}/"):
                raise MoecompressError(f"{out / PLACEMENT_FILE}: file {rel!r} of server {server} is not in server-{server}/")
            path = contained_file(out, rel, PLACEMENT_FILE)
            if checksums and sha256_file(path) != file_sha:
                raise MoecompressError(f"{path}: sha256 does not match {PLACEMENT_FILE}; the bundle was altered")
        verify_files(bundle, checksums)
        missing = sorted(rel for n in read_manifest(bundle)
                         if n != BUNDLE_FILE and (rel := f"server-{server}/{n}") not in entries)
        if missing:
            raise MoecompressError(f"{out / PLACEMENT_FILE}: {missing[0]} is in the bundle's manifest but not in "
                                   f"{PLACEMENT_FILE}; the bundle was modified after `moecompress shard`")
        _check_description(bundle, server, placement, digest)
        _check_held(bundle, server, placement, doc["experts_paths"])
    return doc


def _check_description(bundle: Path, server: int, placement: Placement, digest: str) -> None:
    """bundle.json (pinned by the bundle's manifest) names this server and pins placement.json by its sha256."""
    if not (bundle / BUNDLE_FILE).exists():
        return  # bundles written before bundle.json: placement.json's own hashes pin them
    desc = read_json_object(bundle / BUNDLE_FILE, "bundle description")
    if desc.get("server") != server:
        raise MoecompressError(f"{bundle}/{BUNDLE_FILE} describes server {desc.get('server')!r}, not {server}")
    if desc.get("placement_sha256") != digest:
        raise MoecompressError(f"{bundle.parent / PLACEMENT_FILE}: sha256 does not match {bundle}/{BUNDLE_FILE}; "
                               "placement.json was altered after `moecompress shard`")


def _check_held(bundle: Path, server: int, placement: Placement, experts_paths: list[str]) -> None:
    """The bundle's config.json holds exactly the experts the placement gives `server`, in every projection."""
    qc = read_json_object(bundle / "config.json", "model config").get("quantization_config")
    if not isinstance(qc, dict):
        raise MoecompressError(f"{bundle}/config.json has no moecompress quantization_config")
    spec = FormatSpec.from_dict(qc)
    unknown = sorted(set(spec.experts) - set(experts_paths))
    if unknown:
        raise MoecompressError(f"{bundle}/config.json: experts module {unknown[0]} is not in {PLACEMENT_FILE}")
    for layer, path in enumerate(experts_paths):
        want = tuple(e for e, copies in enumerate(placement.assignment[layer]) if server in copies)
        es = spec.experts.get(path)
        if es is None:
            if want:
                raise MoecompressError(f"{bundle}: holds no experts of {path}; {PLACEMENT_FILE} gives it {list(want)}")
            continue
        if es.num_experts != len(placement.assignment[layer]):
            raise MoecompressError(f"{bundle}: {path} has {es.num_experts} experts, {PLACEMENT_FILE} "
                                   f"{len(placement.assignment[layer])}")
        for proj in es.groups:
            if es.held(proj) != want:
                raise MoecompressError(f"{bundle}: {path}.{proj} holds experts {list(es.held(proj))}, "
                                       f"{PLACEMENT_FILE} gives server {server} {list(want)}")
