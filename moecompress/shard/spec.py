"""ServerSpec: the edge servers a model is placed on, and its parser ("4x64MB", "64MB,64MB,32MB")."""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from moecompress.artifacts.placement import MODES
from moecompress.errors import MoecompressError

BALANCE_MODES = ("total", "layer")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class ServerSpec:
    """Servers and the placement constraints.

    mode: the execution model placed for (moecompress/execution/routing.py): "expert" (requests admitted at the
    home server, dense_servers[0]; experts anywhere) or "pipeline" (contiguous layer ranges per server).
    balance: which routed-token counts must stay within `1 + balance_epsilon` of the mean server:
      "total" (default) - each server's tokens summed over all MoE layers (servers work asynchronously);
      "layer" - each MoE layer separately (servers step layer by layer; stricter, as in expert parallelism).
    With "total", a whole MoE layer on one server is allowed (for the expert model: one row out and one back per
    token, and the other servers idle during that layer); "layer" keeps every layer spread (expert parallelism).
    The balance target is the same for every server, whatever its memory. devices_per_server > 1 places
    experts on devices inside each server too (hierarchical); each device gets an equal share of its server's
    memory left after the dense weights.
    """

    memory_bytes: tuple[int, ...]  # per server
    link_bandwidth: float | None = None  # bytes/s between two servers; only used to report time
    replicate_dense: bool = True  # non-expert weights on every server, else only on the largest one
    balance_epsilon: float = 0.1
    balance: str = "total"
    devices_per_server: int = 1
    mode: str = "expert"

    def __post_init__(self):
        if not self.memory_bytes or any(not isinstance(m, numbers.Integral) or m <= 0 for m in self.memory_bytes):
            raise MoecompressError(f"server memory must be positive whole bytes, got {self.memory_bytes!r}")
        object.__setattr__(self, "memory_bytes", tuple(int(m) for m in self.memory_bytes))
        if self.link_bandwidth is not None and not self.link_bandwidth > 0:
            raise MoecompressError(f"link bandwidth must be positive bytes/s, got {self.link_bandwidth!r}")
        if not self.balance_epsilon >= 0:
            raise MoecompressError(f"balance epsilon must be >= 0, got {self.balance_epsilon!r}")
        if self.balance not in BALANCE_MODES:
            raise MoecompressError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        if self.mode not in MODES:
            raise MoecompressError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.devices_per_server, int) or self.devices_per_server < 1:
            raise MoecompressError(f"devices per server must be a positive integer, got {self.devices_per_server!r}")

    @property
    def num_servers(self) -> int:
        return len(self.memory_bytes)

    @property
    def dense_servers(self) -> tuple[int, ...]:
        """Servers holding the non-expert weights: all, or the one with the most memory (lowest id on ties)."""
        if self.replicate_dense:
            return tuple(range(self.num_servers))
        return (max(range(self.num_servers), key=lambda s: (self.memory_bytes[s], -s)),)

    @property
    def home(self) -> int:
        """Expert model: the server admitting requests (it holds the dense weights and the KV cache)."""
        return self.dense_servers[0]

    def expert_capacity(self, dense_bytes: int) -> tuple[int, ...]:
        """Bytes each server has left for experts once it holds its dense weights (negative: not even those).

        Their sum is the expert budget a bit allocation must meet for the model to fit (`--budget-from-servers`).
        """
        dense = set(self.dense_servers)
        return tuple(m - (dense_bytes if s in dense else 0) for s, m in enumerate(self.memory_bytes))


def parse_bytes(text: str) -> int:
    """'64MB' -> 64_000_000, '1.5GiB' -> 1610612736, '4096' -> 4096 (KB/MB/GB are 1000-based, KiB/MiB/GiB 1024)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise MoecompressError(
            f"cannot read a size from {text!r}; write a number with an optional unit: B, KB, MB, GB, TB, "
            "KiB, MiB, GiB, TiB (e.g. 64MB or 1.5GiB)"
        )
    return int(round(float(m.group(1)) * _UNITS[unit]))


def parse_servers(text: str, **options) -> ServerSpec:
    """A ServerSpec from 'COUNTxSIZE' and/or comma-separated sizes: '4x64MB', '64MB,64MB,32MB', '2x1GB,512MB'.

    `options` are the other ServerSpec fields (link_bandwidth, replicate_dense, balance_epsilon, ...).
    """
    memory: list[int] = []
    for item in str(text).split(","):
        count, sep, size = item.strip().partition("x")
        if sep and count.strip().isdigit():
            if int(count) < 1:
                raise MoecompressError(f"server count must be at least 1 in {item.strip()!r}")
            memory += [parse_bytes(size)] * int(count)
        else:
            memory.append(parse_bytes(item))
    return ServerSpec(memory_bytes=tuple(memory), **options)
