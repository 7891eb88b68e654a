"""Loading moecompress checkpoints: the one entry point that checks files before transformers reads them."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError

from moecompress.errors import MoecompressError
from moecompress.format.files import MANIFEST, NO_VERIFY_ENV, PLACEMENT_FILE, read_json_object, refuse_partial, verify_files
from moecompress.format.spec import FormatSpec, read_spec
from moecompress.runtime.loading.hf_quantizer import register
from moecompress.runtime.loading.validate import files_checked

BUNDLE_FILE = "bundle.json"  # a server bundle's description of itself (written by `moecompress shard`)


def check_checkpoint(directory: str | Path, verify: bool = True) -> FormatSpec:
    """Refuse an unfinished write, check every file against the manifest (when `verify`), parse the spec."""
    if not Path(directory).is_dir():
        raise MoecompressError(f"{directory} is not a directory; give a moecompress checkpoint directory")
    refuse_partial(directory)
    spec = read_spec(directory)  # first: a plain model directory gets "not a moecompress checkpoint"
    if verify and os.environ.get(NO_VERIFY_ENV) != "1":
        verify_files(directory)
    return spec


def from_pretrained(directory: str | Path, *, verify: bool = True, expert_budget: int | None = None, store=None,
                    **kwargs):
    """Load a moecompress checkpoint (or one server's bundle that holds a full model) as a transformers model.

    Checks that the directory is a moecompress checkpoint and that no weight file is missing, truncated or altered
    (sha256 against moecompress.json when `verify`), then calls AutoModelForCausalLM.from_pretrained. A server
    bundle that holds only experts (or only some layers) is refused: it is not a full model.

    expert_budget (bytes) or store (a runtime.store.StoreConfig): keep at most that many bytes of experts in memory,
    the rest read from the checkpoint's files on use (runtime/store/); the store is `model.expert_store`.
    """
    check_checkpoint(directory, verify)
    refuse_partial_bundle(directory)
    model = _load(directory, **kwargs)
    if expert_budget is not None or store is not None:
        from moecompress.runtime.store import StoreConfig, attach_store
        from moecompress.format.expert_stats import EXPERT_STATS_FILE
        from moecompress.runtime.store.store import default_config

        has_stats = (Path(directory) / EXPERT_STATS_FILE).exists()
        config = store if store is not None else default_config(expert_budget, has_stats)
        if not isinstance(config, StoreConfig):
            raise MoecompressError(f"store must be a moecompress.runtime.store.StoreConfig, got {type(config).__name__}")
        model.expert_store = attach_store(model, directory, config)
    return model


def bundle_holds(directory: str | Path) -> str | None:
    """What a server bundle holds ("full", "experts", "layers"), from its bundle.json (or, for bundles written before
    bundle.json, from the placement.json beside it); None for a plain checkpoint."""
    directory = Path(directory)
    if (directory / BUNDLE_FILE).exists():
        return str(read_json_object(directory / BUNDLE_FILE, "bundle description").get("holds", "full"))
    manifest, placement = directory / MANIFEST, directory.parent / PLACEMENT_FILE
    if not (manifest.exists() and placement.exists()):
        return None
    server = read_json_object(manifest, "checksum manifest").get("server")
    if type(server) is not int:
        return None
    dense = read_json_object(placement, "placement").get("dense_servers", ())
    return "full" if isinstance(dense, list) and server in dense else "experts"


def refuse_partial_bundle(directory: str | Path) -> None:
    holds = bundle_holds(directory)
    if holds not in (None, "full"):
        server = Path(directory).name.removeprefix("server-")
        raise MoecompressError(
            f"{directory} holds only {holds}: this is server {server}'s bundle of a deployment, not a full model; "
            f"run it with `moecompress run/generate --bundles {Path(directory).parent}`"
        )


def load_checkpoint(directory: str | Path, *, verify: bool = True, **kwargs):
    """from_pretrained without the partial-bundle check (the edge runtime loads a home server's bundle with it)."""
    check_checkpoint(directory, verify)
    return _load(directory, **kwargs)


def _load(directory: str | Path, **kwargs):
    """transformers' from_pretrained on a checked directory (the quantizer's hook skips re-hashing it)."""
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:
        raise MoecompressError("do not pass quantization_config: a moecompress checkpoint carries its own in config.json")
    register()
    try:
        with files_checked(directory):
            return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except SafetensorError as exc:
        raise MoecompressError(f"{directory}: a safetensors file is unreadable ({exc}); re-export the checkpoint") from exc
