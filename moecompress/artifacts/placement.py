"""Placement: which edge server (and device) holds each routed expert, written by `shard`, read by the runtime.

`mode` names the execution model (moecompress/execution/routing.py says what each moves):
- "expert": requests are admitted at `home`, which holds the dense (non-expert) weights and the KV cache;
  `assignment[layer][expert]` is the tuple of servers holding a copy of that expert, primary first (which copy
  serves a token is routing.route_pairs). Every server of `dense_servers` holds the dense weights.
- "pipeline": `layer_servers[i]` is the server of decoder layer i, contiguous ranges in order; each MoE layer's
  experts are held once, by its layer's server; `server_dense_bytes[s]` is the non-expert bytes server s holds (its
  layers' attention, norms and routers; the first stage also embeddings, final norm and lm_head).
Bytes are exact on-disk bytes of each expert at its own bit-width (all its projections, scales and zeros).
Files written before `mode` existed load as the expert model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecompress.errors import MoecompressError

MODES = ("expert", "pipeline")
Grid = tuple[tuple[tuple[int, ...], ...], ...]  # [layer][expert] -> one int per copy


@dataclass(frozen=True)
class Placement:
    memory_bytes: tuple[int, ...]  # per server
    assignment: Grid  # [layer][expert] -> servers holding it, primary first
    expert_bytes: tuple[tuple[int, ...], ...]  # [layer][expert]
    dense_bytes: int  # non-expert weights, counted on each of `dense_servers`
    dense_servers: tuple[int, ...]  # all servers (replicated) or one
    devices_per_server: int = 1
    devices: Grid = ()  # same shape as assignment: device of each copy on its server; () when one device
    method: str = ""  # the algorithm that produced it
    files: dict[int, dict[str, str]] = field(default_factory=dict)  # server -> {filename: sha256}
    mode: str = "expert"  # execution model: expert | pipeline
    home: int | None = None  # server admitting requests (holds dense weights + KV); None -> dense_servers[0]
    layer_servers: tuple[int, ...] = ()  # pipeline: server of every decoder layer, non-decreasing
    server_dense_bytes: tuple[int, ...] = ()  # pipeline: non-expert bytes held by each server

    def __post_init__(self):
        n = self.num_servers
        if n < 1:
            raise MoecompressError("a placement needs at least one server")
        if self.mode not in MODES:
            raise MoecompressError(f"placement mode {self.mode!r}; allowed: {', '.join(MODES)}")
        object.__setattr__(self, "expert_bytes", tuple(tuple(int(b) for b in row) for row in self.expert_bytes))
        object.__setattr__(self, "server_dense_bytes", tuple(int(b) for b in self.server_dense_bytes))
        if self.home is None and self.dense_servers:
            first = self.layer_servers[0] if self.layer_servers else self.dense_servers[0]
            object.__setattr__(self, "home", int(first))
        if len(self.assignment) != len(self.expert_bytes) or any(
            len(a) != len(b) for a, b in zip(self.assignment, self.expert_bytes)
        ):
            raise MoecompressError("placement assignment and expert_bytes must both be [layer][expert]")
        for layer, experts in enumerate(self.assignment):
            for expert, servers in enumerate(experts):
                if not servers or len(set(servers)) != len(servers) or not all(0 <= s < n for s in servers):
                    raise MoecompressError(
                        f"layer {layer} expert {expert}: servers {servers} must be distinct ids in 0..{n - 1}, "
                        "at least one"
                    )
        if not self.dense_servers or not all(0 <= s < n for s in self.dense_servers):
            raise MoecompressError(f"dense_servers {self.dense_servers} must be server ids in 0..{n - 1}")
        if self.home not in self.dense_servers:
            raise MoecompressError(f"home server {self.home} must hold the dense weights (dense_servers "
                                   f"{list(self.dense_servers)})")
        if self.mode == "pipeline":
            self._check_pipeline()
        elif self.layer_servers or self.server_dense_bytes:
            raise MoecompressError("layer_servers and server_dense_bytes belong to the pipeline mode only")
        if self.devices:
            shape = [[len(s) for s in layer] for layer in self.assignment]
            if [[len(d) for d in layer] for layer in self.devices] != shape:
                raise MoecompressError("placement devices must have the shape of assignment (one per copy)")
            if any(not 0 <= d < self.devices_per_server for layer in self.devices for ds in layer for d in ds):
                raise MoecompressError(f"device ids must be in 0..{self.devices_per_server - 1}")
        elif self.devices_per_server != 1:
            raise MoecompressError("a placement with several devices per server must give each copy's device")
        self.check_memory()

    def _check_pipeline(self) -> None:
        n, ls = self.num_servers, self.layer_servers
        if not ls or any(not 0 <= s < n for s in ls) or any(b < a for a, b in zip(ls, ls[1:])):
            raise MoecompressError(f"pipeline layer_servers {list(ls)} must be server ids in 0..{n - 1}, one per "
                                   "decoder layer, in non-decreasing order (contiguous ranges)")
        if len(self.server_dense_bytes) != n or any(b < 0 for b in self.server_dense_bytes):
            raise MoecompressError(f"pipeline server_dense_bytes must give {n} non-negative byte counts")
        if self.home != ls[0] or tuple(self.dense_servers) != tuple(sorted(set(ls))):
            raise MoecompressError(f"pipeline: home must be the first stage ({ls[0]}) and dense_servers the stage "
                                   f"servers {sorted(set(ls))}")
        stage = [layer[0][0] for layer in self.assignment]
        if any(len(set(c for copies in layer for c in copies)) != 1 or any(len(c) != 1 for c in layer)
               for layer in self.assignment) or any(b < a for a, b in zip(stage, stage[1:])):
            raise MoecompressError("pipeline: each MoE layer's experts must be held once, all on one server, with "
                                   "the layers' servers in non-decreasing order")
        if len(ls) == self.num_layers and tuple(stage) != tuple(ls):
            raise MoecompressError(f"pipeline: MoE layers on servers {stage} disagree with layer_servers {list(ls)}")

    @property
    def stages(self) -> tuple[int, ...]:
        """Pipeline: the servers holding layers, in order (a server appears once)."""
        return tuple(dict.fromkeys(self.layer_servers))

    @property
    def num_servers(self) -> int:
        return len(self.memory_bytes)

    @property
    def num_layers(self) -> int:
        return len(self.assignment)

    @property
    def num_experts(self) -> int:
        return len(self.assignment[0]) if self.assignment else 0

    def servers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        """Servers holding a copy of (layer, expert), primary first."""
        return self.assignment[layer][expert]

    def primary(self, layer: int, expert: int) -> int:
        return self.assignment[layer][expert][0]

    def primaries(self) -> tuple[tuple[int, ...], ...]:
        """[layer][expert] primary server of every expert."""
        return tuple(tuple(servers[0] for servers in layer) for layer in self.assignment)

    def dense_bytes_on(self, server: int) -> int:
        if self.server_dense_bytes:
            return self.server_dense_bytes[server]
        return self.dense_bytes if server in self.dense_servers else 0

    @property
    def server_bytes(self) -> tuple[int, ...]:
        """Bytes each server holds: its expert copies at their own sizes plus the dense weights it holds."""
        used = [self.dense_bytes_on(s) for s in range(self.num_servers)]
        for experts, sizes in zip(self.assignment, self.expert_bytes):
            for servers, size in zip(experts, sizes):
                for s in servers:
                    used[s] += size
        return tuple(used)

    def device_bytes(self) -> dict[tuple[int, int], int]:
        """Expert bytes on each (server, device); dense weights not included (counted once per server)."""
        used: dict[tuple[int, int], int] = {}
        for layer, experts in enumerate(self.assignment):
            for expert, servers in enumerate(experts):
                for copy, s in enumerate(servers):
                    d = self.devices[layer][expert][copy] if self.devices else 0
                    used[(s, d)] = used.get((s, d), 0) + self.expert_bytes[layer][expert]
        return used

    def check_memory(self) -> None:
        for s, (used, cap) in enumerate(zip(self.server_bytes, self.memory_bytes)):
            if used > cap:
                raise MoecompressError(f"server {s} holds {used} bytes, over its memory of {cap} bytes")
        if self.devices_per_server > 1:
            for (s, d), used in self.device_bytes().items():
                cap = (self.memory_bytes[s] - self.dense_bytes_on(s)) // self.devices_per_server
                if used > cap:
                    raise MoecompressError(f"server {s} device {d} holds {used} expert bytes, over its {cap}")

    def to_json(self) -> dict:
        return {
            "num_servers": self.num_servers,
            "memory_bytes": list(self.memory_bytes),
            "server_bytes": list(self.server_bytes),
            "dense_bytes": self.dense_bytes,
            "dense_servers": list(self.dense_servers),
            "devices_per_server": self.devices_per_server,
            "method": self.method,
            "assignment": [[list(s) for s in layer] for layer in self.assignment],
            "devices": [[list(d) for d in layer] for layer in self.devices],
            "expert_bytes": [list(b) for b in self.expert_bytes],
            "files": {str(s): dict(f) for s, f in sorted(self.files.items())},
            "mode": self.mode,
            "home": self.home,
            "layer_servers": list(self.layer_servers),
            "server_dense_bytes": list(self.server_dense_bytes),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Placement":
        p = cls(
            memory_bytes=tuple(int(m) for m in d["memory_bytes"]),
            assignment=as_grid(d["assignment"]),
            expert_bytes=tuple(tuple(int(b) for b in row) for row in d["expert_bytes"]),
            dense_bytes=int(d["dense_bytes"]),
            dense_servers=tuple(int(s) for s in d["dense_servers"]),
            devices_per_server=int(d.get("devices_per_server", 1)),
            devices=as_grid(d.get("devices", ())),
            method=str(d.get("method", "")),
            files={int(s): {str(k): str(v) for k, v in f.items()} for s, f in d.get("files", {}).items()},
            mode=str(d.get("mode", "expert")),
            home=int(d["home"]) if d.get("home") is not None else None,
            layer_servers=tuple(int(s) for s in d.get("layer_servers", ())),
            server_dense_bytes=tuple(int(b) for b in d.get("server_dense_bytes", ())),
        )
        for key, value in (("num_servers", p.num_servers), ("server_bytes", list(p.server_bytes))):
            if key in d and d[key] != value:
                raise MoecompressError(f"placement {key} {d[key]} disagrees with its assignment ({value})")
        return p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        return cls.from_json(json.loads(Path(path).read_text()))


def as_grid(rows) -> Grid:
    """Nested [layer][expert][copy] ints (lists, arrays) as the tuples a Placement holds."""
    return tuple(tuple(tuple(int(x) for x in cell) for cell in row) for row in rows)
