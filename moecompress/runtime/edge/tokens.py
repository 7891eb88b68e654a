"""Token policies for a deployment: resolve what the user selected (CLI `--tokens`, recipe section, Python API) into
a pipeline, and the settings the home's dispatchers run it with.

`--tokens` / `deploy(tokens=...)` take a spec string (`int8+protect:first=4+prune_server:threshold=0.2`; see
execution/tokens/policy.py), a YAML file with a `tokens:` section (a recipe, or a file of its own), a list or dict
of policies, or a TokenPipeline. User policies registered with `register_policy` are found by name. The
`substitute` policy's expert similarity: passed in, else the home bundle's expert_similarity.safetensors (the
calibration co-activation `moecompress shard` writes). Low-bit copies of remote experts on the home, for
`localize:copies=true`: `attach_home_copies(deployment, low_bit_checkpoint, copies)`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.policy import PolicyState, TokenPipeline, build_pipeline

SIMILARITY_FILE = "expert_similarity.safetensors"  # in a bundle: [MoE layers, experts, experts], key `similarity`


def resolve_pipeline(tokens) -> TokenPipeline:
    """The pipeline of a `tokens` selection (None / "" / "none": no policy)."""
    if isinstance(tokens, TokenPipeline):
        return tokens
    if isinstance(tokens, (str, Path)) and str(tokens).endswith((".yaml", ".yml")):
        return build_pipeline(token_section(Path(tokens)))
    return build_pipeline(tokens)


def token_section(path: Path):
    """The `tokens` section of a YAML file (a recipe or a file of its own)."""
    import yaml

    if not path.exists():
        raise MoecompressError(f"token policies: {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "tokens" not in data:
        raise MoecompressError(f"token policies: {path} has no top-level `tokens` section")
    return data["tokens"]


def load_similarity(similarity) -> torch.Tensor | None:
    """[L, E, E] from a tensor, a torch.save file or a safetensors file (key `similarity`)."""
    if similarity is None or isinstance(similarity, torch.Tensor):
        return similarity
    path = Path(similarity)
    if not path.exists():
        raise MoecompressError(f"expert similarity file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "similarity" not in tensors:
            raise MoecompressError(f"{path} has no tensor `similarity` ([MoE layers, experts, experts])")
        return tensors["similarity"]
    return torch.load(path, weights_only=True)


def token_settings(info, pipeline: TokenPipeline, similarity=None, copies: torch.Tensor | None = None):
    """The dispatchers' TokenSettings for the home of `info` (expert model only); copies [L, E] bool: the home's
    low-bit copies (`home_copies`)."""
    import json

    from moecompress.execution.routing import Mode
    from moecompress.runtime.edge.dispatcher import TokenSettings

    if info.mode != Mode.EXPERT:
        raise MoecompressError(f"token policies act on the expert model's exchange; this deployment runs the "
                               f"{info.mode.value} model (shard it with --mode expert, or drop --tokens)")
    sim = load_similarity(similarity)
    L, E = len(info.assignment), len(info.assignment[0]) if info.assignment else 0
    if any(p.name == "substitute" for p in pipeline.policies):
        shipped = Path(info.directory) / SIMILARITY_FILE  # what `moecompress shard` writes (co-activation)
        if sim is None and shipped.exists():
            sim = load_similarity(shipped)
        if sim is None:
            raise MoecompressError("the substitute policy needs an expert similarity [MoE layers, experts, experts]: "
                                   "pass similarity= (a tensor or file) to deploy, or --token-similarity FILE "
                                   f"(bundles written by `moecompress shard` carry one: {SIMILARITY_FILE})")
    if sim is not None and tuple(sim.shape) != (L, E, E):
        raise MoecompressError(f"expert similarity must be [{L}, {E}, {E}] for this deployment, got "
                               f"{tuple(sim.shape)}")
    config = json.loads((Path(info.directory) / "config.json").read_text())
    renormalize = bool(config.get("norm_topk_prob", True))
    return TokenSettings(pipeline, renormalize, PolicyState(similarity=sim, copies=copies))


def keep_experts(module, experts) -> int:
    """Trim a PackedExperts, before its first call, to `experts` (the others' packed tensors are freed; they
    contribute nothing); returns
    the bytes it still holds (every packed tensor of the kept experts: qweight, scales, zeros, bias)."""
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


def attach_home_copies(deployment, checkpoint, copies) -> int:
    """Give the home of a running expert-model deployment low-bit copies of remote experts: `copies` [L][expert ids]
    read from the low-bit `checkpoint` (same model, e.g. every expert at 2-3 bits). Only token policies use them
    (`localize:copies=true` computes a localized token's copied experts with them; every other pair is computed as
    before). Returns the bytes the copies hold (what the home spends on them). Experts the home already holds at
    full precision are refused (copy only remote experts)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    info = deployment.info
    dispatchers = {m.layer: m for m in deployment.model.modules() if isinstance(m, DispatchedExperts)}
    if not dispatchers:
        raise MoecompressError("home copies need the expert model's dispatchers (deploy a --mode expert shard)")
    for layer, ids in enumerate(copies):
        held = [int(e) for e in ids if info.home in info.assignment[layer][int(e)]]
        if held:
            raise MoecompressError(f"MoE layer {layer}: the home holds expert(s) {held[:4]} already; copy only remote "
                                   "experts")
    dtype = next(deployment.model.parameters()).dtype
    modules, total = load_home_copies(checkpoint, info.experts_paths, copies, dtype)
    for layer, module in enumerate(modules):
        dispatchers[layer].copies = module
    settings = deployment.tokens
    if settings is not None:  # the running policies see the copies now
        deployment.set_tokens(settings.pipeline, settings.state.similarity)
    return total


def home_copies(model) -> torch.Tensor | None:
    """[L, E] bool: the low-bit copies attached to a home model's dispatchers (None when it has none)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    layers = sorted((m.layer, m) for m in model.modules() if isinstance(m, DispatchedExperts))
    if not any(m.copies is not None for _, m in layers):
        return None
    out = torch.zeros(len(layers), layers[0][1].num_experts, dtype=torch.bool)
    for layer, m in layers:
        if m.copies is not None:
            out[layer, list(m.copies.held_experts())] = True
    return out
