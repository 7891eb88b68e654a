"""The accumulators of calibration: routing counts, co-activation, activation paths, Hessians, routing trace.

`RoutingRecorder` is fed, per MoE layer and batch, exactly what the experts module receives after routing
(hidden states [T, H], top-k indices [T, K], top-k weights [T, K]), and per dense linear its input. It drops
padding tokens itself (routing does not look at the attention mask): `begin_batch` gives it the flattened
mask of the batch. Everything here is tensors in, tensors accumulated; the hooks that call it live in hooks.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.arch import ModelLayout, MoELayer, proj_bias, proj_weights
from moecompress.artifacts.calibration_stats import write_layer_hessians


@dataclass(frozen=True)
class RecordSpec:
    """What to accumulate besides the counts."""

    hessians: bool = True
    all_experts: bool = False  # unweighted Hessians see every kept token, not only the routed ones
    trace: bool = False
    hessian_dtype: torch.dtype = torch.float32


def expert_intermediate(experts: nn.Module, moe_layer: MoELayer, expert: int, x: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """The input of `down` for tokens `x` [n, H] sent to `expert`: act(gate) * up (the module's own `_apply_gate`,
    e.g. GPT-OSS's clamped interleaved SwiGLU), or act(up) for ungated experts; bias added when present.
    Computed in `dtype` from the canonical weights. Returns [n, I]."""
    first = moe_layer.projs[0]
    w = proj_weights(experts, moe_layer, first)[expert].to(dtype)  # [out, in]
    b = proj_bias(experts, moe_layer, first)
    h = F.linear(x, w, None if b is None else b[expert].to(dtype))  # [n, 2I] or [n, I]
    if first.name == "gate_up":
        apply_gate = getattr(experts, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return experts.act_fn(gate) * up
    return experts.act_fn(h)


class RoutingRecorder:
    """Accumulates the statistics of every MoE layer of `layout` (and of the dense linears it is fed)."""

    def __init__(self, layout: ModelLayout, num_domains: int = 0, spec: RecordSpec = RecordSpec()):
        self.layout = layout
        self.spec = spec
        self.L = layout.num_layers
        sizes = {m.num_experts for m in layout.moe_layers}
        if len(sizes) != 1:
            raise ValueError(f"MoE layers with different expert counts {sorted(sizes)} are not supported")
        self.E = sizes.pop()
        self.D = num_domains
        L, E, D = self.L, self.E, self.D
        self.tokens = torch.zeros(L, E, dtype=torch.int64)
        self.mass = torch.zeros(L, E, dtype=torch.float64)
        self.coactivation = torch.zeros(L, E * E, dtype=torch.int64)
        self.paths = torch.zeros(max(L - 1, 0), E * E, dtype=torch.int64)
        self.domain_tokens = torch.zeros(L, D * E, dtype=torch.int64)
        self.domain_mass = torch.zeros(L, D * E, dtype=torch.float64)
        self.hessian_tokens = torch.zeros(L, E, dtype=torch.int64)
        self.hessians: dict[str, torch.Tensor] = {}  # "<layer>.<proj>[.weighted]" -> [E, in, in]
        self.dense: dict[str, torch.Tensor] = {}  # linear path -> [in, in]
        self.dense_tokens: dict[str, int] = {}
        self.num_tokens = 0
        self._prev: dict[tuple[int, int], torch.Tensor] = {}  # (layer, batch) -> kept top-k indices, for paths
        self._trace: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch = -1
        self._keep: torch.Tensor | None = None  # [T] bool, None = keep all
        self._n = 0  # tokens in the batch, padding included
        self._domain: torch.Tensor | None = None  # [T_kept] int64 domain id of each kept token
        self._counted: set[int] = set()

    # ---- batch state ---------------------------------------------------------------------------------------

    def begin_batch(self, batch: int, attention_mask: torch.Tensor, domain_ids: torch.Tensor | None = None):
        """Set the batch the next records belong to. attention_mask [B, S] (1 = token, 0 = padding), flattened
        the way MoE blocks flatten tokens ([B*S]); domain_ids [B] (one domain per sequence) or None."""
        self._batch = batch
        keep = attention_mask.reshape(-1).bool()
        self._n = keep.numel()
        self._keep = None if bool(keep.all()) else keep
        self._domain = None
        if domain_ids is not None and self.D > 0:
            per_token = domain_ids.to(torch.int64).repeat_interleave(attention_mask.shape[-1])  # [B*S]
            self._domain = per_token if self._keep is None else per_token[keep.to(per_token.device)]
        if batch not in self._counted:
            self._counted.add(batch)
            self.num_tokens += int(keep.sum())

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of t [T, ...] that are not padding."""
        if t.shape[0] != self._n:
            raise RuntimeError(f"recorded {t.shape[0]} tokens but the batch has {self._n} (attention mask [B, S])")
        if self._keep is None:
            return t
        return t[self._keep.to(t.device)]

    # ---- MoE layers ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def record_experts(self, moe_layer: MoELayer, experts: nn.Module, hidden: torch.Tensor,
                       top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        layer, E = moe_layer.layer, self.E
        hidden = hidden.reshape(-1, hidden.shape[-1])
        n_all = hidden.shape[0]
        x = self._kept(hidden)  # [T, H]
        idx = self._kept(top_k_index.reshape(n_all, -1))  # [T, K]
        w = self._kept(top_k_weights.reshape(n_all, -1))  # [T, K]
        T, K = idx.shape
        flat = idx.reshape(-1)  # [T*K]
        wf = w.reshape(-1).to(torch.float64)
        cpu_flat = flat.cpu()
        self.tokens[layer] += torch.bincount(cpu_flat, minlength=E)
        self.mass[layer] += torch.bincount(cpu_flat, weights=wf.cpu(), minlength=E)
        pairs = (idx.unsqueeze(2) * E + idx.unsqueeze(1)).reshape(-1)  # [T*K*K]
        self.coactivation[layer] += torch.bincount(pairs.cpu(), minlength=E * E)
        if self._domain is not None:
            d = self._domain.to(flat.device).repeat_interleave(K) * E + flat
            self.domain_tokens[layer] += torch.bincount(d.cpu(), minlength=self.D * E)
            self.domain_mass[layer] += torch.bincount(d.cpu(), weights=wf.cpu(), minlength=self.D * E)
        prev = self._prev.pop((layer - 1, self._batch), None)
        if prev is not None:
            p = (prev.to(idx.device).unsqueeze(2) * E + idx.unsqueeze(1)).reshape(-1)
            self.paths[layer - 1] += torch.bincount(p.cpu(), minlength=E * E)
        if layer + 1 < self.L:
            self._prev[(layer, self._batch)] = idx.to(torch.int64).cpu()
        if self.spec.trace:
            self._trace[(layer, self._batch)] = (idx.to(torch.int32).cpu(), w.to(torch.float32).cpu())
        if self.spec.hessians:
            self._accumulate_hessians(moe_layer, experts, x, flat, w.reshape(-1))

    def _hessian(self, key: str, n_experts: int, dim: int, device) -> torch.Tensor:
        h = self.hessians.get(key)
        if h is None:
            h = self.hessians[key] = torch.zeros(n_experts, dim, dim, dtype=self.spec.hessian_dtype, device=device)
        return h

    def _accumulate_hessians(self, moe_layer: MoELayer, experts: nn.Module, x: torch.Tensor, flat: torch.Tensor,
                             w: torch.Tensor) -> None:
        """One sort by expert, then per expert one matmul per Hessian: X_e^T X_e and (w X_e)^T (w X_e)."""
        layer, E, K = moe_layer.layer, self.E, flat.numel() // max(x.shape[0], 1)
        dt = self.spec.hessian_dtype
        first, down = moe_layer.projs[0].name, "down"
        H, I = x.shape[-1], moe_layer.proj("down").in_features
        h_in = self._hessian(f"{layer}.{first}", E, H, x.device)
        h_in_w = self._hessian(f"{layer}.{first}.weighted", E, H, x.device)
        h_dn = self._hessian(f"{layer}.{down}", E, I, x.device)
        h_dn_w = self._hessian(f"{layer}.{down}.weighted", E, I, x.device)
        xd = x.to(dt)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        tok = order // K
        xs = xd[tok]  # [T*K, H] grouped by expert
        ws = w[order].to(dt).unsqueeze(1)  # [T*K, 1]
        if self.spec.all_experts:
            h_in += xd.T @ xd  # every kept token feeds every expert
            self.hessian_tokens[layer] += x.shape[0]
        else:
            self.hessian_tokens[layer] += torch.tensor(counts, dtype=torch.int64)
        start = 0
        for e, n in enumerate(counts):
            seg = slice(start, start + n)
            start += n
            xe, we = xs[seg], ws[seg]
            if self.spec.all_experts:
                a_all = expert_intermediate(experts, moe_layer, e, xd, dt)  # [T, I]
                h_dn[e].addmm_(a_all.T, a_all)
                ae = a_all[tok[seg]]
            elif n:
                h_in[e].addmm_(xe.T, xe)
                ae = expert_intermediate(experts, moe_layer, e, xe, dt)  # [n, I]
                h_dn[e].addmm_(ae.T, ae)
            if n:
                xw, aw = xe * we, ae * we
                h_in_w[e].addmm_(xw.T, xw)
                h_dn_w[e].addmm_(aw.T, aw)

    # ---- dense linears -------------------------------------------------------------------------------------

    @torch.no_grad()
    def record_dense(self, path: str, x: torch.Tensor) -> None:
        x = self._kept(x.reshape(-1, x.shape[-1])).to(self.spec.hessian_dtype)
        h = self.dense.get(path)
        if h is None:
            h = self.dense[path] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.spec.hessian_dtype,
                                               device=x.device)
        h.addmm_(x.T, x)
        self.dense_tokens[path] = self.dense_tokens.get(path, 0) + x.shape[0]

    def spill_layer(self, layer: int, directory) -> None:
        """Write MoE layer `layer`'s expert Hessians to directory/hessians.<layer>.safetensors and drop them from
        memory (once the layer has seen every batch)."""
        keys = [k for k in self.hessians if k.split(".", 1)[0] == str(layer)]
        if keys:
            write_layer_hessians(directory, layer, {k.split(".", 1)[1]: self.hessians.pop(k) for k in keys})

    # ---- results -------------------------------------------------------------------------------------------

    def trace(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([T, L, K] int32 indices, [T, L, K] float32 weights) in batch order, or None without trace."""
        if not self.spec.trace or not self._trace:
            return None
        batches = sorted({b for _, b in self._trace})
        idx, wts = [], []
        for b in batches:
            idx.append(torch.stack([self._trace[(l, b)][0] for l in range(self.L)], dim=1))
            wts.append(torch.stack([self._trace[(l, b)][1] for l in range(self.L)], dim=1))
        return torch.cat(idx), torch.cat(wts)
