"""Expert similarity matrices for the `substitute` policy (pure functions).

- `expert_similarity`: from the expert weights, functionally: the cosine between two experts' outputs on the same
  probe inputs (calibration hidden states of that layer, or seeded Gaussian rows when none are given). Works with any
  experts callable (a transformers experts module, PackedExperts), so with quantized weights too.
- `similarity_from_coactivation`: from calibration co-activation counts [E, E] (how often two experts are chosen by
  the same token), normalised to a cosine-like score count[i, j] / sqrt(count[i, i] * count[j, j]).
"""
from __future__ import annotations

import torch


def _cosine(outputs: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.normalize(outputs.flatten(1).float(), dim=-1)  # [E, P * H]
    return flat @ flat.T


@torch.no_grad()
def expert_similarity(experts, num_experts: int, probe: torch.Tensor | None = None, hidden_size: int | None = None,
                      samples: int = 256, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[E, E] cosine similarity of the experts' outputs on `probe` [P, H] (or `samples` seeded Gaussian rows)."""
    if probe is None:
        g = torch.Generator().manual_seed(seed)
        probe = torch.randn(samples, hidden_size, generator=g).to(dtype)
    P = probe.shape[0]
    ones = torch.ones(P, 1, dtype=probe.dtype)
    outputs = torch.stack([experts(probe, torch.full((P, 1), e, dtype=torch.long), ones)
                           for e in range(num_experts)])  # [E, P, H]
    return _cosine(outputs)


def similarity_from_coactivation(counts: torch.Tensor) -> torch.Tensor:
    """[E, E] normalised co-activation (diagonal 1 for experts ever chosen, 0 for never-chosen ones)."""
    c = counts.float()
    d = c.diagonal().clamp_min(0).sqrt()
    return c / (d[:, None] * d[None, :]).clamp_min(1e-30)
