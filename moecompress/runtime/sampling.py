"""The generation request both decoders take (cpu_step.CpuDecoder, cuda.graph_decode.GraphDecoder): its checks
(`check_request`) and picking the next token on the device without a host sync (what graph_decode captures in a
CUDA graph; the CPU step calls the same function).

`pick_tokens` is greedy (argmax) or a draw from softmax(logits / temperature), optionally restricted to the top-p
nucleus with transformers' rule (TopPLogitsWarper: drop the least likely tokens while the mass dropped stays
<= 1 - top_p, always keep the most likely one). The draw uses the exponential race: argmax(p / E) with E ~ Exp(1)
i.i.d. is a token drawn with probability p, with one random tensor and no host sync (torch.multinomial may sync); E is kept above 0 (a 0 would make a
token outside the nucleus 0 / 0 = NaN, which argmax takes).
Temperature and top_p are device tensors, so a captured graph takes new values without a new capture.
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError


def check_request(decoder: str, batch_size: int, max_cache_len: int, input_ids: torch.Tensor, max_new_tokens: int,
                  sample: bool, temperature: float, top_p: float) -> None:
    """Refuse, naming the fix, a request that `decoder` (made for batch_size rows, max_cache_len slots) cannot run."""
    batch, n = input_ids.shape
    if batch != batch_size:
        raise MoecompressError(f"this {decoder} was made for batch_size={batch_size}, got {batch} rows")
    if max_new_tokens < 1 or n < 1 or n + max_new_tokens > max_cache_len:
        raise MoecompressError(f"prompt {n} + max_new_tokens {max_new_tokens} must fit max_cache_len="
                               f"{max_cache_len} (and both be >= 1): make a {decoder} with a larger one")
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise MoecompressError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p});"
                               " for greedy decoding pass sample=False")


def top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scores [B, V] (float) -> the same with the tokens outside the top-p nucleus at -inf."""
    ascending, order = scores.sort(dim=-1)
    mass = ascending.softmax(-1).cumsum(-1)  # [B, V]: mass of the tokens up to and including each, least likely first
    drop = mass <= (1 - top_p)
    drop[:, -1] = False  # the most likely token stays
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def pick_tokens(logits: torch.Tensor, sample: bool, temperature: torch.Tensor | None = None,
                top_p: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> tokens [B, 1]: argmax, or (sample) one draw per row at `temperature` ([1] tensor), from the
    top-p nucleus when top_p ([1] tensor) is given."""
    if not sample:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if top_p is not None:
        scores = top_p_filter(scores, top_p)
    probs = scores.softmax(-1)  # [B, V]
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(-1, keepdim=True)
