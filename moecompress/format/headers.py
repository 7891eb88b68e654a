"""safetensors headers, read and checked without reading (or allocating) any tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets}, "__metadata__": {...}}), then the tensor bytes. Every field is checked against the file's real size, so
a forged header (a [1<<40] tensor, offsets past the end, overlapping tensors) is an error here, before any loader
trusts it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.format.sizes import DTYPE_BYTES

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ALL_DTYPES = {**DTYPE_BYTES, "U16": 2, "I16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorHeader:
    dtype: str  # safetensors dtype name: "U8", "F16", "BF16", "F32", ...
    shape: tuple[int, ...]


def read_header(path: str | Path) -> dict[str, TensorHeader]:
    """name -> (dtype, shape) of every tensor in a safetensors file; MoecompressError naming the file if malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoecompressError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
                raise MoecompressError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise MoecompressError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MoecompressError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MoecompressError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorHeader] = {}
    spans = []
    for name, entry in doc.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise MoecompressError(f"{path}: __metadata__ must map strings to strings")
            continue
        out[name] = _tensor(path, name, entry, data_bytes, spans)
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise MoecompressError(f"{path}: tensor {name} starts at byte {start}, not {end}: tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise MoecompressError(f"{path}: tensors cover {end} bytes of {data_bytes}: the file is truncated or padded")
    return out


def _tensor(path: Path, name: str, entry, data_bytes: int, spans: list) -> TensorHeader:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise MoecompressError(f"{path}: tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ALL_DTYPES:
        raise MoecompressError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MoecompressError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise MoecompressError(f"{path}: tensor {name!r} has data_offsets {offsets!r} outside the file's {data_bytes} data bytes")
    nbytes = math.prod(shape) * ALL_DTYPES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise MoecompressError(f"{path}: tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, "
                               f"its data_offsets give {offsets[1] - offsets[0]}")
    spans.append((offsets[0], offsets[1], name))
    return TensorHeader(dtype, tuple(shape))
