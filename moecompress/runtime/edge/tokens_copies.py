"""Low-bit copies of remote experts on a home, for the token policy `localize:copies=true`.

Two ways in: the copies bundle `moecompress shard --home-copies BITS` writes into every home's bundle (loaded by
every command that runs the deployment when its policy asks for copies), or `attach_home_copies(deployment,
low_bit_checkpoint, copies)` (Python API). The copies bundle, `server-K/home-copies/`, is a bundle of a low-bit
checkpoint in the format of every other bundle (format/spec.py: config.json's quantization_config lists the experts
it holds, at `bits`, model.safetensors their packed tensors, the checksum manifest moecompress.json) holding only
the experts chosen for home K, plus home_copies.json: {"home": K, "bits": B, "experts": [[ids] per MoE layer],
"bytes": stored bytes}; placement.json pins its files as it pins the bundle's. Mixed-bit copies (`--home-copies-high
H`): the bundle holds both widths (a mixed checkpoint) and home_copies.json adds "high": {"bits": H, "experts": [[ids]
per MoE layer]}, the experts of "experts" held at H bits (the others at B); the runtime computes them as
attach_home_copy_sources does with the two parts (CopiesUnion: the high part, then the low one). A policy's
`copy_bits=B` names the copies' low width (the bits every copy has at least): B of a mixed bundle is accepted, H is not.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.policy import TokenPipeline

HOME_COPIES_DIR = "home-copies"  # in a home's bundle: the copies bundle
HOME_COPIES_FILE = "home_copies.json"  # in the copies bundle: home, bits, experts [L][ids], bytes


def wanted_copy_bits(pipeline: TokenPipeline) -> int | None:
    """None when no policy computes on copies; else the bits asked for (0: any)."""
    wanted = [int(getattr(p, "copy_bits", 0)) for p in pipeline.policies if getattr(p, "copies", False) is True]
    if not wanted:
        return None
    bits = set(wanted) - {0}
    if len(bits) > 1:
        raise MoecompressError(f"token policies ask for copies at different bits {sorted(bits)}; the home holds one set")
    return bits.pop() if bits else 0


def bundled_copies(info, pipeline: TokenPipeline) -> tuple[Path, dict] | None:
    """(copies bundle directory, its home_copies.json) of the home of `info` when `pipeline` computes on copies
    (None when it does not); a missing bundle, one made for another server or at other bits is a clear error."""
    from moecompress.format.files import read_json_object

    bits = wanted_copy_bits(pipeline)
    if bits is None:
        return None
    directory = Path(info.directory) / HOME_COPIES_DIR
    if not (directory / HOME_COPIES_FILE).is_file():
        raise MoecompressError(f"the token policy asks for low-bit home copies (localize:copies=true), but "
                               f"{directory} is missing: shard with `moecompress shard ... --home-copies BITS` (every "
                               "home gets its copies), or attach them with "
                               "runtime.edge.tokens_copies.attach_home_copies")
    desc = read_json_object(directory / HOME_COPIES_FILE, "home copies description")
    L = len(info.experts_paths)
    experts = desc.get("experts")
    high = desc.get("high", {"bits": desc.get("bits"), "experts": [[] for _ in range(L)]})

    def id_lists(x):
        return isinstance(x, list) and len(x) == L and all(
            isinstance(ids, list) and all(type(e) is int for e in ids) for ids in x)

    if (desc.get("home") != info.server or type(desc.get("bits")) is not int or not id_lists(experts)
            or not isinstance(high, dict) or type(high.get("bits")) is not int or not id_lists(high.get("experts"))
            or any(not set(h) <= set(ids) for h, ids in zip(high["experts"], experts))
            or ("high" in desc and high["bits"] <= desc["bits"])):
        raise MoecompressError(f"{directory / HOME_COPIES_FILE}: expected home {info.server}, integer bits and "
                               f"{L} lists of expert ids (and for mixed bits a \"high\" part at higher bits listing "
                               "some of them); re-run `moecompress shard --home-copies`")
    if bits and desc["bits"] != bits:
        mixed = f"{high['bits']}/{desc['bits']}-bit mixed copies (low width {desc['bits']})" if "high" in desc \
            else f"{desc['bits']}-bit copies"
        raise MoecompressError(f"the token policy asks for {bits}-bit home copies (copy_bits={bits}); {directory} "
                               f"holds {mixed}: use copy_bits={desc['bits']} (or leave it out), "
                               f"or re-shard with --home-copies {bits}")
    return directory, desc


def copy_parts(desc: dict) -> list[tuple[int, list[list[int]]]]:
    """[(bits, [L][ids])] of a checked home_copies.json: the high-bit part first when mixed, then the low-bit one."""
    high = desc.get("high")
    if high is None:
        return [(desc["bits"], desc["experts"])]
    low = [sorted(set(ids) - set(h)) for ids, h in zip(desc["experts"], high["experts"])]
    return [(high["bits"], high["experts"]), (desc["bits"], low)]


def use_bundled_copies(model, info, pipeline: TokenPipeline) -> torch.Tensor | None:
    """[L, E] bool: the copies the home model has: those attached already, else, when `pipeline` computes on copies,
    the home's copies bundle (checked against its manifest unless the bundle was read with verify=False, and against
    its description, then attached); None without."""
    have = home_copies(model)
    found = bundled_copies(info, pipeline) if have is None else None
    if found is None:
        return have
    from moecompress.format.files import verify_files
    from moecompress.format.spec import read_spec

    directory, desc = found
    if info.verify:
        verify_files(directory)
    spec = read_spec(directory)
    parts = copy_parts(desc)
    for bits, experts in parts:  # each width's groups hold exactly its experts
        for path, ids in zip(info.experts_paths, experts):
            es = spec.experts.get(path)
            groups = [set(g.get(bits, ())) for g in es.groups.values()] if es is not None else []
            if (ids or groups) and (not groups or any(g != set(ids) for g in groups)):
                raise MoecompressError(f"{directory}: {path} does not hold experts {ids[:4]} at {bits} bits as "
                                       f"{HOME_COPIES_FILE} says (it holds {sorted(groups[0])[:4] if groups else []} "
                                       "at those bits); re-shard")
    nbytes = attach_copy_sources(model, info, [(directory, experts) for _, experts in parts if any(experts)])
    if nbytes != desc.get("bytes"):
        raise MoecompressError(f"{directory}: the copies hold {nbytes} bytes, {HOME_COPIES_FILE} says "
                               f"{desc.get('bytes')}; re-shard")
    return home_copies(model)


def settings_with_copies(model, info, settings) -> None:
    """A home model just built with token `settings`: when its policies compute on copies, load the home's copies
    bundle and give them to the settings (shared by the model's dispatchers)."""
    from dataclasses import replace

    if settings.state.copies is None and wanted_copy_bits(settings.pipeline) is not None:
        settings.state = replace(settings.state, copies=use_bundled_copies(model, info, settings.pipeline))


def keep_experts(module, experts) -> int:
    """Trim a PackedExperts, before its first call, to `experts` (the others' packed tensors are freed; they
    contribute nothing); returns the bytes it still holds (every packed tensor of the kept experts: qweight, scales,
    zeros, bias)."""
    from moecompress.runtime.experts.packed_experts import ProjGroups
    from moecompress.runtime.experts.packed_group import PackedGroup

    keep = {int(e) for e in experts}
    for group in module.modules():
        if isinstance(group, PackedGroup):
            idx = [i for i, e in enumerate(group.experts) if e in keep]
            for name, buf in list(group._buffers.items()):
                if buf is not None:
                    group._buffers[name] = buf[idx].clone()
            group.experts = tuple(group.experts[i] for i in idx)
    for proj in module.modules():
        if isinstance(proj, ProjGroups):
            proj.set_computed(keep)
    return sum(b.numel() * b.element_size() for g in module.modules() if isinstance(g, PackedGroup)
               for b in g._buffers.values() if b is not None)


def load_home_copies(checkpoint, experts_paths, copies, dtype) -> tuple[list, int]:
    """([L] PackedExperts holding only the experts `copies` [L][ids] of the low-bit `checkpoint` (None for a layer
    without any), their bytes in total): the home's low-bit copies of remote experts."""
    from moecompress.runtime.edge.rank_model import materialise, meta_model

    checkpoint = Path(checkpoint)
    if len(copies) != len(experts_paths):
        raise MoecompressError(f"home copies list {len(copies)} MoE layers, the deployment has {len(experts_paths)}")
    wanted = [p for p, ids in zip(experts_paths, copies) if len(ids)]
    model = meta_model(checkpoint, dtype)
    materialise(model, checkpoint, wanted, dtype)
    modules, total = [], 0
    for path, ids in zip(experts_paths, copies):
        if not len(ids):
            modules.append(None)
            continue
        module = model.get_submodule(path)
        missing = sorted({int(e) for e in ids} - set(module.held_experts()))
        if missing:
            raise MoecompressError(f"{checkpoint} holds no expert {missing[:4]} of {path}; copies must be experts "
                                   "of that checkpoint")
        total += keep_experts(module, ids)
        modules.append(module)
    return modules, total


class CopiesUnion(torch.nn.Module):
    """The copies of one MoE layer read from several checkpoints (e.g. the hottest remote experts at 8 bits, the
    others at 4): called like one PackedExperts, each part computes the pairs of the experts it holds (the others'
    ids become the sentinel `num_experts`, which contributes nothing) and the parts' outputs add up."""

    def __init__(self, parts: list):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.num_experts = parts[0].num_experts
        self._held = [torch.tensor(p.held_experts(), dtype=torch.long) for p in parts]

    def held_experts(self) -> tuple[int, ...]:
        return tuple(sorted(e for p in self.parts for e in p.held_experts()))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = None
        for part, held in zip(self.parts, self._held):
            mine = torch.isin(top_k_index, held.to(top_k_index.device))
            if not bool(mine.any()):
                continue
            ids = torch.where(mine, top_k_index, torch.full_like(top_k_index, self.num_experts))
            y = part(hidden_states, ids, top_k_weights)
            out = y if out is None else out + y
        return torch.zeros_like(hidden_states) if out is None else out


def attach_copies(model, info, checkpoint, copies) -> int:
    """Give the dispatchers of a home `model` (the home of `info`) the experts `copies` [L][ids] of the low-bit
    `checkpoint`; returns their bytes. Experts the home holds at full precision are refused."""
    return attach_copy_sources(model, info, [(checkpoint, copies)])


def attach_copy_sources(model, info, sources) -> int:
    """attach_copies from several checkpoints: `sources` [(checkpoint, copies [L][ids])], each expert from one of them
    (an expert listed twice is refused); returns the bytes they hold together."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    dispatchers = {m.layer: m for m in model.modules() if isinstance(m, DispatchedExperts)}
    if not dispatchers:
        raise MoecompressError("home copies need the expert model's dispatchers (deploy a --mode expert shard)")
    seen = [set() for _ in info.experts_paths]
    for _, copies in sources:
        for layer, ids in enumerate(copies):
            held = [int(e) for e in ids if info.home in info.assignment[layer][int(e)]]
            if held:
                raise MoecompressError(f"MoE layer {layer}: the home holds expert(s) {held[:4]} already; copy only "
                                       "remote experts")
            twice = sorted(seen[layer] & {int(e) for e in ids}) if layer < len(seen) else []
            if twice:
                raise MoecompressError(f"MoE layer {layer}: expert(s) {twice[:4]} are copied from two checkpoints; "
                                       "give each expert one source")
            if layer < len(seen):
                seen[layer] |= {int(e) for e in ids}
    dtype = next(model.parameters()).dtype
    parts, total = [[] for _ in info.experts_paths], 0
    for checkpoint, copies in sources:
        modules, nbytes = load_home_copies(checkpoint, info.experts_paths, copies, dtype)
        total += nbytes
        for layer, module in enumerate(modules):
            if module is not None:
                parts[layer].append(module)
    for layer, found in enumerate(parts):
        dispatchers[layer].copies = None if not found else found[0] if len(found) == 1 else CopiesUnion(found)
    return total


def attach_home_copies(deployment, checkpoint, copies) -> int:
    """Give the home of a running expert-model deployment low-bit copies of remote experts: `copies` [L][expert ids]
    read from the low-bit `checkpoint` (same model, e.g. every expert at 2-3 bits). Only token policies use them
    (`localize:copies=true` computes a localized token's copied experts with them; every other pair is computed as
    before). Returns the bytes the copies hold (what the home spends on them). Experts the home already holds at
    full precision are refused (copy only remote experts)."""
    return attach_home_copy_sources(deployment, [(checkpoint, copies)])


def attach_home_copy_sources(deployment, sources) -> int:
    """attach_home_copies from several checkpoints, `sources` [(checkpoint, copies [L][ids])] (e.g. the hottest remote
    experts from an 8-bit checkpoint, the others from a 4-bit one; each expert from one source): a token made local
    computes each copied expert with the copy of its source. Returns the bytes of all the copies."""
    total = attach_copy_sources(deployment.model, deployment.info, sources)
    settings = deployment.tokens
    if settings is not None:  # the running policies see the copies now
        deployment.set_tokens(settings.pipeline, settings.state.similarity)
    return total


def home_copies(model) -> torch.Tensor | None:
    """[L, E] bool: the low-bit copies attached to a home model's dispatchers (None when it has none)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    layers = sorted(((m.layer, m) for m in model.modules() if isinstance(m, DispatchedExperts)), key=lambda x: x[0])
    if not any(m.copies is not None for _, m in layers):
        return None
    out = torch.zeros(len(layers), layers[0][1].num_experts, dtype=torch.bool)
    for layer, m in layers:
        if m.copies is not None:
            out[layer, list(m.copies.held_experts())] = True
    return out
