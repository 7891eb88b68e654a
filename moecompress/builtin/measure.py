"""What the build reports about its model: held-out perplexity per domain and how unevenly routers spread tokens."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast


def eval_windows(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int) -> torch.Tensor:
    """The texts as one EOS-separated stream cut into non-overlapping windows: int64 [n_windows, seq_len + 1].

    Consecutive windows share one boundary token, so every token after the first is predicted exactly once; a
    tail shorter than a window is dropped.
    """
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    stream = torch.tensor([i for enc in encodings for i in (*enc.ids, eos)], dtype=torch.long)
    n = max(0, (stream.numel() - 1) // seq_len)
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def evaluate(
    model, tokenizer: PreTrainedTokenizerFast, docs: list[dict], seq_len: int = 128, batch_size: int = 32
) -> dict:
    """Perplexity per domain and pooled ("all"), and routing load per MoE layer, in one pass over `docs`.

    docs: `{"domain", "text"}` dicts. Routing: each token's top-k experts counted; `max_over_mean` /
    `min_over_mean` per layer compare the busiest / idlest expert with the mean (1.0 = perfectly even).
    """
    model.eval()
    top_k = model.config.num_experts_per_tok
    by_domain = defaultdict(list)
    for d in docs:
        by_domain[d["domain"]].append(d["text"])
    nll, count = defaultdict(float), defaultdict(int)
    load = None  # [layers, experts] token counts
    for domain, texts in sorted(by_domain.items()):
        for batch in eval_windows(tokenizer, texts, seq_len).split(batch_size):
            out = model(input_ids=batch[:, :-1], output_router_logits=True)
            logits = out.logits.flatten(0, 1).float()  # [b * seq_len, vocab]
            nll[domain] += F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum").item()
            count[domain] += batch[:, 1:].numel()
            chosen = torch.stack([lg.topk(top_k, dim=-1).indices for lg in out.router_logits])  # [L, tokens, k]
            counts = F.one_hot(chosen, out.router_logits[0].shape[-1]).sum(dim=(1, 2))  # [L, E]
            load = counts if load is None else load + counts
    if load is None:
        raise ValueError(f"too little evaluation text for one window of {seq_len + 1} tokens")
    ppl = {d: math.exp(nll[d] / count[d]) for d in nll if count[d]}
    ppl["all"] = math.exp(sum(nll.values()) / sum(count.values()))
    mean = load.float().mean(dim=1)
    return {
        "ppl": ppl,
        "tokens": dict(count),
        "expert_tokens": load.tolist(),
        "max_over_mean": (load.float().max(dim=1).values / mean).tolist(),
        "min_over_mean": (load.float().min(dim=1).values / mean).tolist(),
    }
