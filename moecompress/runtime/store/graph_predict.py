"""Layer l+1's router prediction computed inside layer l's captured graph (StoreConfig(graph_prediction=True), on the
GPU tier's slot table with gpu_graphs and prefetch="router").

On the decode thread the router prediction cost ~350 µs per layer call on the H200's host (its launches, two record
copies, the refine's launches: eval/results/store_gpu_s26.md), more than the whole graph replay of the layer. Here
the same arithmetic is part of the layer's graph (slot_graphs.GraphCall), after the experts' launches:

    first:  layer l+1's router on the experts' input x under the RMSNorm rescale  (RouterPredictor.scores)
    refine: layer l+1's router on residual + out under layer l+1's RMSNorm          (RouterPredictor.residual_scores)
    each:   top `width` of the mean softmax over the call's tokens -> values [width] float32, ids [width] int64

and the graph writes the ranked ids and values beside the call's record in pinned host memory. The bookkeeping
thread reads them with the record and, after the precision gate and the score floor (store.ExpertStore._request_ranked,
the rules the decode-thread prediction uses), enqueues layer l+1's side-stream copies itself (they are asynchronous:
no prefetch thread needed). The prediction writes nothing the layer's output depends on: a wrong one costs copies,
never changes results.
"""
from __future__ import annotations

import torch

from moecompress.runtime.store.prefetch import RouterPredictor


class GraphPrediction:
    """What layer `layer`'s graph computes to predict layer `layer + 1` (pure torch: captured on CUDA, run eagerly
    on the CPU by the tests)."""

    def __init__(self, predictor: RouterPredictor, layer: int, width: int, refine: bool):
        self.predictor, self.layer, self.width, self.refine = predictor, layer, width, refine
        self.rows = 2 if refine else 1  # first prediction, then the refined one

    @staticmethod
    def make(predictor, layer: int, top_k: int, width: int | None, refine: bool) -> GraphPrediction | None:
        """The graph prediction for `layer`'s calls, or None where the router prediction has nothing to say (no
        next layer, no router there, another predictor). refine: only where layer l+1's norm and epsilon are known."""
        if not isinstance(predictor, RouterPredictor):
            return None
        nxt = layer + 1
        if nxt >= len(predictor.routers) or predictor.routers[nxt] is None:
            return None
        experts = predictor.routers[nxt].shape[0]
        refine = refine and predictor.norms[nxt] is not None and predictor.eps[nxt] is not None
        return GraphPrediction(predictor, layer, min(width or top_k, experts), refine)

    @property
    def experts(self) -> int:
        return self.predictor.routers[self.layer + 1].shape[0]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor):
        """x [T, H] the experts' input, residual [T, H] the stream entering layer l's MoE block (refine only), out
        [T, H] the experts' output -> values [rows, width] float32, ids [rows, width] int64, best first."""
        scores = [self.predictor.scores(self.layer, x, None, None)]  # [E] each, summing to 1
        if self.refine:
            scores.append(self.predictor.residual_scores(self.layer, residual + out.to(residual.dtype)))
        top = torch.topk(torch.stack(scores), self.width, dim=-1)
        return top.values, top.indices
