"""The arguments of a transformers 5.x experts call, as every MoE class passes them (positionally or by name)."""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError

ROUTING_ARG_NAMES = (
    ("hidden_states",),
    ("top_k_index", "router_indices", "selected_experts", "topk_indices"),
    ("top_k_weights", "routing_weights", "router_scores", "topk_weights"),
)


def routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) of an experts call."""
    out, rest = [], list(args)
    for names in ROUTING_ARG_NAMES:
        if rest:
            out.append(rest.pop(0))
            continue
        found = [kwargs[n] for n in names if n in kwargs]
        if not found:
            raise MoecompressError(f"experts module called without {names[0]}; cannot read its routing")
        out.append(found[0])
    return tuple(out)
