"""Put a loaded model's (or one rank's) experts under an ExpertStore: index each expert's rows in the checkpoint's
safetensors files, drop the loaded packed groups, pin, start prefetch, hook every PackedExperts module.

The packed groups are loaded whole first (transformers' loading) and dropped here: the peak at load is the fully
resident size; after `attach_store`, resident expert bytes stay within the budget.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.expert_stats import read_expert_stats
from moecompress.format.spec import group_prefix
from moecompress.runtime.loading.file_pages import release_unused
from moecompress.format.spec import read_spec
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.store.cache import ExpertCache, ProjShape, StoreLayout
from moecompress.runtime.store.fused import layer_settings
from moecompress.runtime.store.prefetch import make_predictor
from moecompress.runtime.store.slots import HostExperts, SlotTable, slot_table_supported
from moecompress.runtime.store.store import ExpertStore, LayerView, StoreConfig
from moecompress.runtime.store.tiers import FileTier, PinnedTier, row_source, tensor_index


class _Tier:
    """FileTier (or PinnedTier) with each expert's row sources: read_expert(key) -> {(proj, name): tensor}."""

    def __init__(self, sources: dict, config: StoreConfig, device: torch.device, host: HostExperts | None = None):
        """host: the experts in pinned memory for the GPU slot table (slots.py); then `slots` (set per store) reads."""
        self.files = FileTier(direct=config.direct_io)
        self.sources = sources
        self.host = host
        self.slots: SlotTable | None = None
        self.pinned = PinnedTier(self.files, sources, device) if config.tier == "pinned" and host is None else None

    @property
    def bytes_read(self) -> int:
        if self.slots is not None:
            return self.slots.bytes_read
        return self.pinned.bytes_read if self.pinned is not None else self.files.bytes_read

    @property
    def busy_s(self) -> float | None:
        if self.slots is not None:
            return self.slots.busy_s
        return self.pinned.busy_s if self.pinned is not None else None

    def read_expert(self, key) -> dict:
        if self.slots is not None:
            return self.slots.read_expert(key)
        if self.pinned is not None:
            return self.pinned.read_expert(key)
        return self.files.read(self.sources[key])

    def evict(self, key) -> None:
        if self.slots is not None:
            self.slots.evict(key)

    def wait_ready(self, key) -> None:
        if self.slots is not None:
            self.slots.wait_ready(key)

    def recycle(self, buffers: list, limit: int) -> None:
        """An evicted expert's row buffers (cache.py), for the next reads (file tier only)."""
        if self.pinned is None:
            self.files.pool.give(buffers, limit)

    def close(self) -> None:
        self.files.close()


def _buffer_names(bits: int, symmetric: bool, has_bias: bool) -> list[str]:
    names = ["weight"] if bits == 16 else ["qweight", "scales"] + ([] if symmetric else ["zeros"])
    return names + (["bias"] if has_bias else [])


def _dtype_of(group: PackedGroup, name: str, fallback: torch.dtype) -> torch.dtype:
    if name in ("qweight", "zeros"):
        return torch.uint8
    if name == "scales":
        return group.scales.dtype
    t = group._buffers.get(name)
    return t.dtype if t is not None else fallback


def _layout(modules: dict[int, PackedExperts], paths: dict[int, str], index: dict, group_size: int, symmetric: bool,
            compute_dtype: torch.dtype, device) -> tuple[StoreLayout, dict]:
    num_layers = max(modules) + 1
    shapes: list[dict] = [{} for _ in range(num_layers)]
    nbytes, sources = {}, {}
    for layer, module in modules.items():
        for proj in module.proj_names:
            for group in getattr(module, proj).children():
                prefix = group_prefix(paths[layer], proj, group.bits)
                names = _buffer_names(group.bits, symmetric, module.has_bias)
                dtypes = {name: _dtype_of(group, name, compute_dtype) for name in names}
                shape = ProjShape(group.bits, group.in_features, group.out_features, module.has_bias,
                                  dtypes.get("weight", dtypes.get("bias", compute_dtype)))
                for e, slot in group.slot.items():
                    key = (layer, e)
                    shapes[layer].setdefault(e, {})[proj] = shape
                    for name in names:
                        src = row_source(index, f"{prefix}.{name}", slot)
                        sources.setdefault(key, {})[(proj, name)] = (src, dtypes[name])
                        resident = torch.Size(src.shape).numel() * torch.empty(0, dtype=dtypes[name]).element_size()
                        nbytes[key] = nbytes.get(key, 0) + resident
    for layer in range(num_layers):  # an expert is computed where every projection holds it
        for e in [e for e, projs in shapes[layer].items() if len(projs) < len(modules[layer].proj_names)]:
            del shapes[layer][e]
            sources.pop((layer, e)), nbytes.pop((layer, e))
    return StoreLayout(shapes, nbytes, group_size, symmetric, compute_dtype, torch.device(device)), sources


def _drop_groups(module: PackedExperts) -> None:
    for group in module.modules():
        if isinstance(group, PackedGroup):
            for name, t in list(group._buffers.items()):
                group._buffers[name] = torch.empty(0, dtype=t.dtype, device=t.device)


def _routers(model: nn.Module | None, paths: dict[int, str], num_experts: dict[int, int]) -> list:
    out = []
    for layer in range(max(paths) + 1):
        weight = None
        if model is not None and layer in paths:
            parent = model.get_submodule(paths[layer].rpartition(".")[0])
            for name in ("gate", "router"):
                w = getattr(getattr(parent, name, None), "weight", None)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts[layer]:
                    weight = w.detach()
                    break
        out.append(weight)
    return out


def _norm_modules(model: nn.Module | None, paths: dict[int, str]) -> list:
    """Per MoE layer: the RMSNorm in front of its MoE block (the decoder layer's post_attention_layernorm), or None."""
    out = []
    for layer in range(max(paths) + 1):
        norm = None
        if model is not None and layer in paths:
            block = paths[layer].rpartition(".")[0].rpartition(".")[0]  # decoder layer of <layer>.mlp.experts
            norm = getattr(model.get_submodule(block), "post_attention_layernorm", None) if block else None
            w = getattr(norm, "weight", None)
            if not (isinstance(w, torch.Tensor) and w.dim() == 1):
                norm = None
        out.append(norm)
    return out


def _norms(model: nn.Module | None, paths: dict[int, str]) -> list:
    """Per MoE layer: the RMSNorm weight in front of its MoE block."""
    return [None if n is None else n.weight.detach() for n in _norm_modules(model, paths)]


def _norm_eps(model: nn.Module | None, paths: dict[int, str]) -> list:
    """Per MoE layer: that RMSNorm's epsilon (None where unknown: no second prediction there)."""
    out = []
    for n in _norm_modules(model, paths):
        eps = getattr(n, "variance_epsilon", getattr(n, "eps", None))
        out.append(float(eps) if isinstance(eps, (int, float)) else None)
    return out


def _hook_residuals(store: ExpertStore, model: nn.Module, paths: dict[int, str]) -> None:
    """Keep the residual stream entering each MoE block (the input of its RMSNorm) for the second prediction."""
    for layer, norm in enumerate(_norm_modules(model, paths)):
        if norm is not None:
            store.hooks.append(norm.register_forward_pre_hook(
                lambda mod, args, layer=layer: store.residuals.__setitem__(layer, args[0].detach())))


def _copy_groups(copies: dict, modules: dict[int, PackedExperts], layout: StoreLayout) -> tuple[dict, int]:
    """copies: layer -> proj -> {"bits", "qweight", "scales"[, "zeros"][, "experts"]} -> resident PackedGroups (rows:
    the ids in "experts", default all experts in id order)."""
    out, total = {}, 0
    for layer, by_proj in copies.items():
        module = modules[layer]
        if module.has_bias:
            continue  # copies carry no bias: experts with biases are never substituted
        out[layer] = {}
        for proj, d in by_proj.items():
            first = next(iter(getattr(module, proj).children()))
            n = d["qweight"].shape[0]
            ids = tuple(d.get("experts", range(n)))
            if len(ids) != n:
                raise MoecompressError(f"MoE layer {layer} {proj}: low-bit copies of {n} experts listed as {len(ids)}")
            g = PackedGroup(ids, d["bits"], first.in_features, first.out_features, layout.group_size,
                            layout.symmetric, False, layout.compute_dtype, device="meta")
            for name in list(g._buffers):
                g._buffers[name] = d[name].to(layout.device)
                total += d[name].numel() * d[name].element_size()
            g.prepare(layout.compute_dtype)
            out[layer][proj] = g
    return out, total


def _without(copies: dict, keys: set) -> dict:
    """The copies (attach_store's form) less the rows of the (layer, expert) keys given."""
    out = {}
    for layer, by_proj in copies.items():
        out[layer] = {}
        for proj, d in by_proj.items():
            ids = list(d.get("experts", range(d["qweight"].shape[0])))
            rows = [i for i, e in enumerate(ids) if (layer, e) not in keys]
            index = torch.tensor(rows, dtype=torch.long, device=d["qweight"].device)
            out[layer][proj] = {**{k: (v.index_select(0, index) if isinstance(v, torch.Tensor) else v)
                                   for k, v in d.items()}, "experts": [ids[i] for i in rows]}
    return out


def checkpoint_copies(directory: Path, spec, paths: dict[int, str]) -> dict | None:
    """The low-bit copies a checkpoint holds (ExpertsSpec.copy_bits), or None."""
    bits = {layer: getattr(spec.experts[p], "copy_bits", None) for layer, p in paths.items()}
    if not any(bits.values()):
        return None
    from moecompress.format.copies import copy_experts, read_copy_group

    return {layer: {proj: {"bits": bits[layer], "experts": copy_experts(spec, p, proj),
                           **read_copy_group(directory, p, proj, bits[layer])}
                    for proj in spec.experts[p].groups}
            for layer, p in paths.items() if bits[layer]}


def attach_store(model: nn.Module | None, directory: str | Path, config: StoreConfig, *,
                 modules: dict[int, PackedExperts] | None = None, paths: dict[int, str] | None = None, stats=None,
                 copies: dict | None = None, predictor=None, top_k: int | None = None, tier=None) -> ExpertStore:
    """Hook an ExpertStore into every PackedExperts of `model`, or into the given {MoE layer: module} with their
    {MoE layer: experts path} (one rank of the edge runtime: `rank_model.load_experts(info, dtype)` and
    `info.experts_paths`; `directory` is then the rank's bundle, layers keep their global MoE ordinals).

    stats: ExpertStats (default: the checkpoint's expert_stats.safetensors, if any); copies: low-bit copies as
    `checkpoint_copies` gives them (default: the checkpoint's own); predictor: an object with `scores(layer, hidden,
    top_k_index, top_k_weights)` overriding config.prefetch (tests use a deliberately wrong one); top_k: experts
    routed per token (default: the model's config), needed where the layers take the fused decode call, which
    computes one token's routed experts together (the smallest workable budget holds them); tier: a slow tier to
    reuse, another store's `cache.tier` over the same experts (the GPU tier's pinned host copy is then read once).
    """
    directory = Path(directory)
    spec = read_spec(directory)
    if modules is None:
        if model is None:
            raise MoecompressError("attach_store needs a model or its experts modules")
        paths = dict(enumerate(spec.experts))
        modules = {layer: model.get_submodule(p) for layer, p in paths.items()}
    elif paths is None:
        raise MoecompressError("attach_store with `modules` needs their experts `paths` ({MoE layer: path})")
    paths = {layer: paths[layer] for layer in modules}
    for layer, m in modules.items():
        if not isinstance(m, PackedExperts):
            raise MoecompressError(f"{paths[layer]} is a {type(m).__name__}, not a moecompress PackedExperts")
    any_group = next(g for m in modules.values() for g in m.modules() if isinstance(g, PackedGroup))
    device = next((t.device for t in any_group.buffers()), torch.device("cpu"))
    compute_dtype = model.dtype if model is not None else torch.float32
    layout, sources = _layout(modules, paths, tensor_index(directory), spec.group_size, spec.symmetric,
                              compute_dtype, device)
    stats = read_expert_stats(directory) if stats is None else stats
    num_experts = spec.experts[paths[min(paths)]].num_experts
    if stats is not None and (stats.mass.shape[0] <= max(paths) or stats.mass.shape[1] != num_experts):
        raise MoecompressError(f"{directory}: expert statistics of shape {list(stats.mass.shape)} do not match the "
                               f"checkpoint's MoE layers 0..{max(paths)} of {num_experts} experts; re-export it")
    copies = checkpoint_copies(directory, spec, paths) if copies is None else copies
    copy_groups, copy_bytes = _copy_groups(copies or {}, modules, layout)
    host = None
    if tier is None and config.tier == "pinned" and config.gpu_slots and slot_table_supported(modules):
        host = HostExperts(modules)  # before the loaded groups are dropped
    for m in modules.values():
        _drop_groups(m)
    if model is not None:
        release_unused(model)
    value = _value(stats, config.domain, layout.nbytes)
    inside = copy_bytes if config.copies_in_budget else 0
    note = f" plus the resident low-bit copies ({copy_bytes} bytes)" if inside else ""
    working_set = 1
    if any(layer_settings(m, layout, layer, copy_groups.get(layer, {}), compute_dtype) is not None
           for layer, m in modules.items()):
        working_set = top_k or _config_top_k(model, directory)
        if working_set is None:
            raise MoecompressError("these experts take the fused decode call, which computes one token's routed "
                                   "experts together: give attach_store top_k= (experts routed per token)")
    if tier is None:
        tier = _Tier(sources, config, device, host)
    elif not isinstance(tier, _Tier) or tier.sources.keys() != sources.keys() or \
            (tier.pinned is not None or tier.host is not None) != (config.tier == "pinned"):
        raise MoecompressError("attach_store(tier=...) takes another store's cache.tier over the same experts and "
                               "of the same StoreConfig.tier")
    cache = ExpertCache(layout, tier, config.budget, config.policy, value, inside, note,
                        working_set)
    cache.copy_bytes = copy_bytes
    tier.slots = None
    if tier.host is not None and config.gpu_slots:  # the device slots this budget holds (slots.py)
        num_experts = {layer: spec.experts[paths[layer]].num_experts for layer in paths}
        tier.slots = SlotTable(tier.host, layout.nbytes, cache.capacity, device, num_experts)
    if predictor is None and config.prefetch is not None:
        routers = _routers(model, paths, {layer: spec.experts[paths[layer]].num_experts for layer in paths})
        predictor = make_predictor(config.prefetch, stats, routers, _norms(model, paths), _norm_eps(model, paths))
    if config.pin_share > 0:
        if not value:
            raise MoecompressError("pinning needs the checkpoint's expert statistics (expert_stats.safetensors), "
                                   "which it lacks; give pin_share=0 or re-export with statistics")
        cache.pin(_pin_value(value, set(modules), predictor is not None), config.pin_share)
    if config.copy_deterministic and copy_groups:  # a pinned expert never runs on its copy: drop those copies
        pinned = {key for key, slot in cache.slots.items() if slot.pinned}
        copy_groups, kept = _copy_groups(_without(copies, pinned), modules, layout)
        cache.give_back_copies(copy_bytes - kept)
    store = ExpertStore(cache, config, predictor, copy_groups)
    if config.prefetch_refine and model is not None and hasattr(predictor, "residual_scores"):
        _hook_residuals(store, model, paths)
    for layer, m in modules.items():
        m.expert_store = LayerView(store, layer)
    return store


def _config_top_k(model, directory: Path) -> int | None:
    """Experts routed per token: the model's config, else the checkpoint's or bundle's config.json."""
    config = getattr(model, "config", None)
    if config is None and (directory / "config.json").exists():
        import json

        config = json.loads((directory / "config.json").read_text())
        config = config.get("text_config", config)
    else:
        config = vars(getattr(config, "text_config", None) or config) if config is not None else {}
    for name in ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _value(stats, domain: str | None, nbytes: dict) -> dict:
    """(layer, expert) -> routing mass per byte (the domain's mass when given)."""
    if stats is None:
        return {}
    mass = stats.mass
    if domain is not None:
        if domain not in stats.domains:
            raise MoecompressError(f"domain {domain!r} is not in the expert statistics; known: {list(stats.domains)}")
        mass = stats.domain_mass[stats.domains.index(domain)]
    return {key: float(mass[key]) / nb for key, nb in nbytes.items()}


# With prefetch, a layer whose predecessor is in the store gets most of its uses read ahead; a layer without one (the
# first MoE layer: nothing runs before it in a step) only from what stays resident. Pinning pays most there, so the
# predicted layers' pinning value is weighted by this (about 1 - the predictors' accuracy, 0.75-0.85 measured; weights
# 1/3..1/8 gave the same hit rates on refmoe-qwen3, eval/results/store.md).
PREDICTED_PIN_WEIGHT = 0.25


def _pin_value(value: dict, layers: set[int], prefetch: bool) -> dict:
    if not prefetch:
        return value
    return {key: v * (PREDICTED_PIN_WEIGHT if key[0] - 1 in layers else 1.0) for key, v in value.items()}


def detach_store(modules) -> None:
    """Unhook (the experts modules keep no weights: reload the model to run it fully resident)."""
    for m in modules:
        if isinstance(m, PackedExperts) and m.expert_store is not None:
            m.expert_store.store.close()
            m.expert_store = None
