"""Token policies for a deployment: resolve what the user selected (CLI `--tokens`, recipe section, Python API) into
a pipeline, and the settings the home's dispatchers run it with.

`--tokens` / `deploy(tokens=...)` take a spec string (`int8+protect:first=4+prune_server:threshold=0.2`; see
execution/tokens/policy.py), a YAML file with a `tokens:` section (a recipe, or a file of its own), a list or dict
of policies, or a TokenPipeline. User policies registered with `register_policy` are found by name. The
`substitute` policy's expert similarity: passed in, else the home bundle's expert_similarity.safetensors (the
calibration co-activation `moecompress shard` writes). Low-bit copies of remote experts on the home, for
`localize:copies=true`: tokens_copies.py (the copies bundle `moecompress shard --home-copies` writes, or
`attach_home_copies(deployment, low_bit_checkpoint, copies)`).
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
    low-bit copies (tokens_copies.home_copies). Without them, a pipeline that asks for copies needs the home's copies
    bundle (checked here, before anything starts; loaded with the model: tokens_copies.use_bundled_copies)."""
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
    if copies is None:
        from moecompress.runtime.edge.tokens_copies import bundled_copies

        bundled_copies(info, pipeline)  # a missing bundle or other bits: a clear error now
    config = json.loads((Path(info.directory) / "config.json").read_text())
    renormalize = bool(config.get("norm_topk_prob", True))
    return TokenSettings(pipeline, renormalize, PolicyState(similarity=sim, copies=copies))
