"""Run a whole bundle set in one process, as one transformers model: the edge runtime's simulation mode.

Every server is built from its own bundle only and they exchange the bytes the distributed runtime exchanges
(moecompress/runtime/edge/): in the expert model each (token, expert) pair is computed by the server that
execution/routing.route_pairs picks, replicas honoured; in the pipeline model each server runs its decoder layers.
With complementary bundles the result equals the full model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.bundle_set import verify_bundles


def load_bundles(out: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """All bundles of a `moecompress shard` output as one model (the home server's), after checking the whole set.

    The model's forward and generate run across the simulated servers; for counters, forward/generate helpers and
    real processes use moecompress.runtime.edge.deploy.
    """
    from moecompress.runtime.edge import deploy

    if kwargs:
        raise MoecompressError(f"load_bundles takes only dtype; got {sorted(kwargs)}")
    verify_bundles(out)
    return deploy(out, simulate=True, dtype=dtype, verify=False).model
