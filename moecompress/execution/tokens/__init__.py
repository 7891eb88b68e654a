"""Token policies of the expert model: what each MoE layer sends where (dedup, protection, pruning, substitution,
fusion, payload precision), as pure functions that the runtime's dispatcher and the traffic replay both call.

Start at policy.py (the protocol, the registry, spec strings; the rules in prune.py, localize.py, fuse.py,
payload.py), plan.py (LayerContext, DispatchPlan, the lossless
plan), exchange.py (the server batches the edge runtime sends for a plan, their bytes, the reply layout),
traffic.py (what a plan sends, the counters' per-layer token statistics) and executor.py (a reference computation
in one process, for experiments without a deployment). The edge runtime runs them in
runtime/edge/dispatcher.py (home) and runtime/edge/handlers.py (PlanServer).
"""
from moecompress.execution.tokens.executor import execute_plan
from moecompress.execution.tokens.fuse import Fuse
from moecompress.execution.tokens.install import PolicyExperts, TokenRun, token_policies
from moecompress.execution.tokens.payload import dequantize_payload, precisions, quantize_payload, row_bytes
from moecompress.execution.tokens.plan import PRUNED, DispatchPlan, LayerContext, lossless_plan
from moecompress.execution.tokens.policy import (
    POLICIES, STAGES, PolicyState, TokenPipeline, TokenPolicy, build_pipeline, make_policy, parse_spec,
    register_policy,
)
from moecompress.execution.tokens.localize import Localize
from moecompress.execution.tokens.prune import Protect, PruneLayer, PruneServer, SkipWeakest, Substitute
from moecompress.execution.tokens.similarity import expert_similarity, similarity_from_coactivation
from moecompress.execution.tokens.traffic import PlanTraffic, exchange_args, plan_traffic

__all__ = [
    "POLICIES", "PRUNED", "STAGES", "DispatchPlan", "Fuse", "LayerContext", "Localize", "PlanTraffic", "PolicyExperts",
    "PolicyState", "Protect", "PruneLayer", "PruneServer", "SkipWeakest", "Substitute", "TokenPipeline", "TokenPolicy",
    "TokenRun",
    "build_pipeline", "dequantize_payload", "exchange_args", "execute_plan", "expert_similarity", "lossless_plan",
    "make_policy", "parse_spec", "plan_traffic", "precisions", "quantize_payload", "register_policy", "row_bytes",
    "similarity_from_coactivation", "token_policies",
]
