"""The edge runtime: run a deployment's per-server bundles as one model, in one process (simulation) or one
process per server over torch.distributed. `deploy(OUT, simulate=...)` returns a Deployment (forward, generate,
counters, close; a context manager). Execution models: moecompress/execution/routing.py."""
from moecompress.runtime.edge.deployment import Deployment, deploy

__all__ = ["Deployment", "deploy"]
