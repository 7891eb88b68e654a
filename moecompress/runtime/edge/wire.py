"""The bytes that cross between servers: a fixed-size header, then one flat uint8 payload.

Framing (`frame`, `unframe`): on gloo a request whose header and payload fit in FRAME_BYTES goes as ONE message
(header bytes then payload bytes; the receiver posts a FRAME_BYTES buffer, gloo delivers a shorter message into it),
a larger one as the header, then the payload. NCCL needs equal sizes on both ends: there every request is two
messages. Replies (their size known to the asker) are a payload alone either way.

Sizes are the ones moecompress/execution/counters.py counts (a test holds them equal). Header fields (int64):
[op, layer, rows, top_k, dtype code, a, b, c]; the op-specific a, b, c are documented where each op is built.
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.counters import HEADER_INTS, ID_BYTES, WEIGHT_BYTES
from moecompress.execution.tokens.exchange import MULTIPLICITY_BYTES
from moecompress.execution.tokens.payload import (
    PRECISION_CODES, SCALE_BYTES, dequantize_payload, quantize_payload, row_bytes,
)

OP_STOP, OP_PING, OP_EXPERT, OP_STATS, OP_STAGE, OP_RESET, OP_PLAN = 0, 1, 2, 3, 4, 5, 6
OP_ADMIT, OP_RESULT = 7, 8  # several homes: a request admitted at another home (a = payload bytes), its result
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
assert ID_BYTES == 4 and WEIGHT_BYTES == 4  # int32 ids, float32 weights below


def header(op: int, layer: int = 0, rows: int = 0, top_k: int = 0, dtype: torch.dtype = torch.float32,
           a: int = 0, b: int = 0, c: int = 0) -> torch.Tensor:
    return torch.tensor([op, layer, rows, top_k, DTYPES.index(dtype), a, b, c], dtype=torch.int64)  # [HEADER_INTS]


def empty_header() -> torch.Tensor:
    return torch.empty(HEADER_INTS, dtype=torch.int64)


FRAME_BYTES = 1 << 16  # the receive buffer of a request's first message (decode requests fit: one message)


def frame(head: torch.Tensor, payload: torch.Tensor | None, one: bool) -> list[torch.Tensor]:
    """The tensors a request is sent as: [header + payload] when `one` (gloo) and it fits FRAME_BYTES, else [header,
    payload] (or [header] without payload)."""
    if payload is None or not payload.numel():
        return [head]
    if one and HEADER_INTS * 8 + payload.numel() <= FRAME_BYTES:
        return [torch.cat([as_bytes(head), payload])]
    return [head, payload]


def first_buffer(one: bool, device) -> torch.Tensor:
    """What the receiver of a request posts first: FRAME_BYTES of uint8 (gloo), else the header alone."""
    return torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device) if one else \
        torch.empty(HEADER_INTS, dtype=torch.int64, device=device)


def unframe(first: torch.Tensor, one: bool) -> tuple[list[int], torch.Tensor | None]:
    """(header, payload) of a received first message (on the CPU); payload None: it follows as a second message
    of payload_bytes(header)."""
    if not one:
        head = first.cpu().tolist()
        return head, (torch.empty(0, dtype=torch.uint8) if payload_bytes(head) == 0 else None)
    first = first.cpu()
    head = first[:HEADER_INTS * 8].view(torch.int64).tolist()
    n = payload_bytes(head)
    if n and HEADER_INTS * 8 + n > FRAME_BYTES:
        return head, None
    return head, first[HEADER_INTS * 8:HEADER_INTS * 8 + n]


def dtype_of(code: int) -> torch.dtype:
    if not 0 <= code < len(DTYPES):
        raise MoecompressError(f"a message carries unknown dtype code {code}; are all servers the same version?")
    return DTYPES[code]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


def _view(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A payload segment as `dtype` (copied when its offset is not aligned for that dtype)."""
    return (part if part.storage_offset() % dtype.itemsize == 0 else part.clone()).view(dtype)


def encode_request(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden [R, H] (model dtype), ids [R, k] (a server's pairs; others = num_experts), weights [R, k]."""
    return torch.cat([as_bytes(hidden), as_bytes(ids.to(torch.int32)), as_bytes(weights.to(torch.float32))])


def request_payload_bytes(rows: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> int:
    return rows * (hidden_size * dtype.itemsize + top_k * (ID_BYTES + WEIGHT_BYTES))


def decode_request(payload: torch.Tensor, rows: int, hidden_size: int, top_k: int, dtype: torch.dtype):
    """-> (hidden [R, H], ids [R, k] long, weights [R, k] float32)."""
    n_h = rows * hidden_size * dtype.itemsize
    n_i = rows * top_k * ID_BYTES
    hidden = _view(payload[:n_h], dtype).reshape(rows, hidden_size)
    ids = _view(payload[n_h:n_h + n_i], torch.int32).reshape(rows, top_k).long()
    weights = _view(payload[n_h + n_i:], torch.float32).reshape(rows, top_k)
    return hidden, ids, weights


def decode_rows(payload: torch.Tensor, rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _view(payload, dtype).reshape(rows, hidden_size)


def encode_stage(hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A pipeline hop: hidden [B, S, H], 2-D attention mask [B, S_kv] (int8), position ids [B, S] (int32)."""
    return torch.cat([as_bytes(hidden), as_bytes(mask.to(torch.int8)), as_bytes(positions.to(torch.int32))])


def decode_stage(payload: torch.Tensor, batch: int, seq: int, kv: int, hidden_size: int, dtype: torch.dtype):
    n_h = batch * seq * hidden_size * dtype.itemsize
    hidden = _view(payload[:n_h], dtype).reshape(batch, seq, hidden_size)
    mask = _view(payload[n_h:n_h + batch * kv], torch.int8).reshape(batch, kv).long()
    positions = _view(payload[n_h + batch * kv:], torch.int32).reshape(batch, seq).long()
    return hidden, mask, positions


def stage_header(first_layer: int, batch: int, seq: int, kv: int, hidden_size: int, dtype: torch.dtype,
                 past: int) -> torch.Tensor:
    """OP_STAGE: layer = the receiving stage's first layer, rows = batch, top_k = seq, a = kv, b = H, c = past."""
    return header(OP_STAGE, first_layer, batch, seq, dtype, kv, hidden_size, past)


def request_header(layer: int, rows: int, top_k: int, dtype: torch.dtype, hidden_size: int) -> torch.Tensor:
    """OP_EXPERT: a = hidden size."""
    return header(OP_EXPERT, layer, rows, top_k, dtype, hidden_size)


# -- token policies: rows at a payload precision, fused rows with multiplicities (execution/tokens/exchange.py) --

def plan_header(layer: int, rows: int, members: int, top_k: int, dtype: torch.dtype, hidden_size: int,
                dispatch: str, ret: str) -> torch.Tensor:
    """OP_PLAN: rows = rows sent, top_k = ids per member, a = hidden size, b = members, c = precision codes
    (dispatch + 8 x return)."""
    return header(OP_PLAN, layer, rows, top_k, dtype, hidden_size, members,
                  PRECISION_CODES.index(dispatch) + 8 * PRECISION_CODES.index(ret))


def plan_precisions(head: list[int]) -> tuple[str, str]:
    c = head[7]
    if not (0 <= c % 8 < len(PRECISION_CODES) and 0 <= c // 8 < len(PRECISION_CODES)):
        raise MoecompressError(f"a message carries unknown payload precision code {c}; are all servers the same "
                               "version?")
    return PRECISION_CODES[c % 8], PRECISION_CODES[c // 8]


def encode_values(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Rows x [R, H] at `precision`: the values, then (int8 / fp8) one float16 scale per row."""
    values, scale = quantize_payload(x, precision)
    parts = [as_bytes(values)]
    if scale is not None:
        parts.append(as_bytes(scale.reshape(-1).to(torch.float16)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def decode_values(payload: torch.Tensor, rows: int, hidden_size: int, precision: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """[R, H] in `dtype` from the bytes `encode_values` wrote."""
    if precision == "native":
        return _view(payload, dtype).reshape(rows, hidden_size)
    if precision == "bf16":
        return _view(payload, torch.bfloat16).reshape(rows, hidden_size).to(dtype)
    wire_dtype = torch.int8 if precision == "int8" else torch.float8_e4m3fn
    n = rows * hidden_size
    values = _view(payload[:n], wire_dtype).reshape(rows, hidden_size)
    scale = _view(payload[n:n + rows * SCALE_BYTES], torch.float16).reshape(rows, 1).float()
    return dequantize_payload(values, scale, dtype)


def encode_plan_request(rows: torch.Tensor, sizes: torch.Tensor, fused: bool, ids: torch.Tensor,
                        weights: torch.Tensor, precision: str) -> torch.Tensor:
    """rows [R, H] (model dtype), sizes [R] (sent when fused), ids / weights [M, k'] of the members in row order."""
    parts = [encode_values(rows, precision)]
    if fused:
        parts.append(as_bytes(sizes.to(torch.int32)))
    parts += [as_bytes(ids.to(torch.int32)), as_bytes(weights.to(torch.float32))]
    return torch.cat(parts)


def decode_plan_request(payload: torch.Tensor, head: list[int]):
    """-> (rows [R, H] model dtype, sizes [R] long, ids [M, k'] long, weights [M, k'] float32, return precision)."""
    _, _, rows, top_k, code, hidden_size, members, _ = head
    dtype = dtype_of(code)
    dispatch, ret = plan_precisions(head)
    n_v = rows * row_bytes(dispatch, hidden_size, dtype.itemsize)
    values = decode_values(payload[:n_v], rows, hidden_size, dispatch, dtype)
    at = n_v
    if members > rows:
        sizes = _view(payload[at:at + rows * MULTIPLICITY_BYTES], torch.int32).long()
        at += rows * MULTIPLICITY_BYTES
    else:
        sizes = torch.ones(rows, dtype=torch.long)
    n_i = members * top_k * ID_BYTES
    ids = _view(payload[at:at + n_i], torch.int32).reshape(members, top_k).long()
    weights = _view(payload[at + n_i:], torch.float32).reshape(members, top_k)
    return values, sizes, ids, weights, ret


def plan_payload_bytes(head: list[int]) -> int:
    _, _, rows, top_k, code, hidden_size, members, _ = head
    dispatch, _ = plan_precisions(head)
    multiplicities = rows * MULTIPLICITY_BYTES if members > rows else 0
    return (rows * row_bytes(dispatch, hidden_size, dtype_of(code).itemsize) + multiplicities
            + members * top_k * (ID_BYTES + WEIGHT_BYTES))


def payload_bytes(head: list[int]) -> int:
    """Size of the payload following a header (0: none)."""
    op, _, rows, top_k, code, a, b, _ = head
    if op == OP_EXPERT:
        return request_payload_bytes(rows, a, top_k, dtype_of(code))
    if op == OP_PLAN:
        return plan_payload_bytes(head)
    if op == OP_STAGE:
        return rows * top_k * b * dtype_of(code).itemsize + rows * a + rows * top_k * 4
    if op == OP_STATS:
        return rows * 3 * 8 if a else 0
    if op in (OP_ADMIT, OP_RESULT):
        return a
    return 0


def encode_object(op: int, obj) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of an admission (OP_ADMIT) or its result (OP_RESULT): a dict of tensors, numbers, strings
    and lists, serialised by torch.save (read back with weights_only=True: no code is loaded)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    return header(op, a=payload.numel()), payload


def decode_object(payload: torch.Tensor):
    import io

    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
