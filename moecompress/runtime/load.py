"""Loading moecompress checkpoints: the one entry point that checks files before transformers reads them."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError

from moecompress.errors import MoecompressError
from moecompress.format.files import verify_files
from moecompress.format.spec import FormatSpec
from moecompress.runtime.hf_quantizer import register


def read_spec(directory: str | Path) -> FormatSpec:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise MoecompressError(f"{directory}: no config.json; expected a moecompress checkpoint directory")
    qc = json.loads(path.read_text()).get("quantization_config")
    if not qc:
        raise MoecompressError(
            f"{directory} is not a moecompress checkpoint (config.json has no quantization_config); "
            "load plain models with transformers.AutoModelForCausalLM.from_pretrained"
        )
    return FormatSpec.from_dict(qc)


def from_pretrained(directory: str | Path, *, verify: bool = True, **kwargs):
    """Load a moecompress checkpoint (or one server's bundle) as a transformers model.

    Checks that the directory is a moecompress checkpoint and that no weight file is missing, truncated or altered
    (sha256 against moecompress.json when `verify`), then calls AutoModelForCausalLM.from_pretrained.
    """
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:
        raise MoecompressError("do not pass quantization_config: a moecompress checkpoint carries its own in config.json")
    read_spec(directory)
    verify_files(directory, checksums=verify)
    register()
    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except SafetensorError as exc:
        raise MoecompressError(f"{directory}: a safetensors file is unreadable ({exc}); re-export the checkpoint") from exc
