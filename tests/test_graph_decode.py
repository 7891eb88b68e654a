"""GraphDecoder (runtime/cuda/graph_decode.py): greedy tokens equal transformers' own greedy loop and generate
(left-padded batches too); sampling (runtime/sampling.py) draws from transformers' top-p distribution.

On the CPU the StaticCache steps run eagerly (what the graph captures); with CUDA, a tiny Qwen3-MoE model whose
experts are packed 2/3/4/8-bit (the Triton kernels) decodes with graph replays and gives the same tokens as the
same steps run eagerly (greedy and sampled, padded or not) and as a DynamicCache loop.
"""
from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.runtime import cuda
from moecompress.runtime.cuda.graph_decode import GraphDecoder, set_cache_length
from moecompress.runtime.sampling import pick_tokens, top_p_filter


def tiny_qwen3_moe(device="cpu", dtype=torch.float32, layers: int = 2):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties in the argmax
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


def dynamic_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy decoding by hand: DynamicCache, one token per forward."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out, step = ids, ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
            step = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, step], 1)
    return out


def test_static_steps_equal_dynamic_cache_greedy():
    """The steps the graph captures, run eagerly: same tokens as a DynamicCache loop, batch 1 and 2, and again
    after a second prompt (the decoder is reused: the cache is rewound)."""
    model = tiny_qwen3_moe()
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        decoder = GraphDecoder(model, max_cache_len=40, batch_size=batch, graph=False)
        for n in (7, 12):
            ids = torch.randint(0, 512, (batch, n), generator=gen)
            got = decoder.generate(ids, max_new_tokens=20)
            assert torch.equal(got, dynamic_greedy(model, ids, 20)), (batch, n)


def test_eos_ends_rows_and_pads_like_transformers():
    model = tiny_qwen3_moe()
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = dynamic_greedy(model, ids, 12)
    eos = int(ref[0, 9])  # a token row 0 generates (the 4th new one)
    got = GraphDecoder(model, 32, 2, graph=False).generate(ids, 12, eos_token_id=eos, pad_token_id=-1)
    first = [(ref[r, 6:] == eos).nonzero()[0, 0].item() if (ref[r, 6:] == eos).any() else 99 for r in range(2)]
    for r in range(2):
        stop = 6 + first[r] + 1
        assert torch.equal(got[r, :stop], ref[r, :stop])
        assert (got[r, stop:] == -1).all()
    assert got.shape[1] == (6 + 12 if max(first) == 99 else 6 + max(first) + 1)


def test_errors_say_what_is_allowed():
    model = tiny_qwen3_moe(layers=1)
    decoder = GraphDecoder(model, 16, graph=False)
    with pytest.raises(MoecompressError, match="max_cache_len"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(MoecompressError, match="batch_size=1"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 2)
    with pytest.raises(MoecompressError, match="left padding"):  # right-padded rows
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(MoecompressError, match="temperature > 0"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 2, sample=True, temperature=0)
    if not torch.cuda.is_available():
        with pytest.raises(MoecompressError, match="CUDA"):
            GraphDecoder(model, 16, graph=True)


def test_set_cache_length_moves_every_layer_counter():
    from transformers import StaticCache

    model = tiny_qwen3_moe(layers=2)
    decoder = GraphDecoder(model, 16, graph=False)
    decoder.generate(torch.zeros(1, 3, dtype=torch.long), 4)
    counters = [layer.cumulative_length for layer in decoder.cache.layers]
    assert isinstance(decoder.cache, StaticCache) and all(int(c) == 6 for c in counters)  # 3 + 3 fed tokens
    set_cache_length(decoder.cache, 2)
    assert all(int(layer.cumulative_length) == 2 for layer in decoder.cache.layers)


def left_padded(lengths: list[int], seed: int, device="cpu", pad: int = 0):
    """Random prompts of `lengths` tokens, left-padded with `pad`: (input_ids, attention_mask) [B, max]."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for r, length in enumerate(lengths):
        ids[r, n - length:] = torch.randint(1, 512, (length,), generator=gen)
        mask[r, n - length:] = 1
    return ids.to(device), mask.to(device)


def test_left_padded_rows_equal_transformers_generate_and_each_row_alone():
    """Prompts of 9, 4 and 6 tokens left-padded to 9: greedy tokens == model.generate with the attention mask, and
    each row's new tokens == that row's prompt run alone without padding."""
    model = tiny_qwen3_moe()
    ids, mask = left_padded([9, 4, 6], seed=4)
    decoder = GraphDecoder(model, 32, 3, graph=False)
    got = decoder.generate(ids, 10, attention_mask=mask)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(got, ref)
    alone = GraphDecoder(model, 32, 1, graph=False)
    for r in range(3):
        row = ids[r:r + 1, mask[r].bool()]
        assert torch.equal(alone.generate(row, 10)[0, row.shape[1]:], got[r, 9:]), r
    assert torch.equal(decoder.generate(ids[:, -4:], 10), dynamic_greedy(model, ids[:, -4:], 10))  # no padding


def test_left_padded_rows_with_eager_attention():
    """Eager attention takes the mask as additive floats (mask_kind "float"): padded greedy == model.generate."""
    from moecompress.runtime.cuda.graph_decode import mask_kind

    model = tiny_qwen3_moe(layers=1)
    model.set_attn_implementation("eager")
    assert mask_kind(model) == "float"
    ids, mask = left_padded([8, 3], seed=9)
    got = GraphDecoder(model, 24, 2, graph=False).generate(ids, 8, attention_mask=mask)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(got, ref)


def test_sampling_repeats_with_a_seed_and_narrows_to_greedy():
    """The same seed draws the same tokens (padded batch, top-p); another seed others; top_p so small that only
    the most likely token stays, or a tiny temperature, gives the greedy tokens."""
    model = tiny_qwen3_moe()
    ids, mask = left_padded([7, 5], seed=5)
    decoder = GraphDecoder(model, 32, 2, graph=False)
    greedy = decoder.generate(ids, 12, attention_mask=mask)
    a = decoder.generate(ids, 12, attention_mask=mask, sample=True, temperature=1.5, top_p=0.9, seed=7)
    b = decoder.generate(ids, 12, attention_mask=mask, sample=True, temperature=1.5, top_p=0.9, seed=7)
    c = decoder.generate(ids, 12, attention_mask=mask, sample=True, temperature=1.5, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, greedy)
    assert torch.equal(decoder.generate(ids, 12, attention_mask=mask, sample=True, top_p=1e-6, seed=1), greedy)
    assert torch.equal(decoder.generate(ids, 12, attention_mask=mask, sample=True, temperature=1e-4, seed=1), greedy)


def test_pick_tokens_draws_from_transformers_top_p_distribution():
    """top_p_filter keeps exactly the tokens transformers' TopPLogitsWarper keeps; 200,000 draws of pick_tokens
    land on each token with softmax(logits / T) restricted to the nucleus, within 0.006 (> 4 standard errors)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 50, generator=gen) * 3
    for top_p in (0.3, 0.8, 0.95, 1.0):
        ours = top_p_filter(logits, torch.tensor([top_p]))
        theirs = TopPLogitsWarper(top_p)(None, logits.clone()) if top_p < 1 else logits
        assert torch.equal(ours.isinf(), theirs.isinf()), top_p
    row = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.9
    expect = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, row.clone())).softmax(-1)[0]
    draws = pick_tokens(row.expand(200_000, 6), True, torch.tensor([temperature]), torch.tensor([top_p]),
                        torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[:, 0], minlength=6).float() / 200_000
    assert (freq - expect).abs().max() < 0.006 and freq[expect == 0].sum() == 0


@pytest.mark.skipif(not cuda.available(), reason=f"CUDA graph decode: {cuda.unavailable_reason()}")
@pytest.mark.parametrize("batch", [1, 2])
def test_graph_replay_tokens_equal_eager_with_packed_experts(batch):
    """bf16 on CUDA, every MoE layer's experts packed at 2/3/4/8 bits (the Triton pair path): graph-replayed
    greedy tokens == the same steps run eagerly (twice: the graph is reused), and start like a DynamicCache loop."""
    model = packed_tiny_model()
    ids = torch.randint(0, 512, (batch, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    graph = GraphDecoder(model, 64, batch)
    first = graph.generate(ids, 24)
    again = graph.generate(ids, 24)  # the captured graph reused for a second call
    eager = GraphDecoder(model, 64, batch, graph=False).generate(ids, 24)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    # a DynamicCache attends over fewer positions (other bf16 roundings): the first tokens agree
    assert torch.equal(eager[:, :13], dynamic_greedy(model, ids, 4))


def packed_tiny_model():
    """tiny_qwen3_moe in bf16 on CUDA, every MoE layer's experts packed at 2/3/4/8 bits (the Triton pair path)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cuda_kernels import random_experts

    model = tiny_qwen3_moe("cuda", torch.bfloat16)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts = random_experts(8, 128, 64, [2, 3, 4, 8, 3, 2, 4, 3], group_size=32, device="cuda",
                                           template=layer.mlp.experts, seed=i)
    return model


@pytest.mark.skipif(not cuda.available(), reason=f"CUDA graph decode: {cuda.unavailable_reason()}")
def test_graph_replay_padded_and_sampled_equal_eager_with_packed_experts():
    """Left-padded rows (prompts of 9, 3 and 6 tokens), greedy, sampled and sampled with top-p, one decoder (a graph
    per mode): graph-replayed tokens == the same steps run eagerly with the same seed; the seed repeats the draws."""
    model = packed_tiny_model()
    ids, mask = left_padded([9, 3, 6], seed=8, device="cuda")
    graph, eager = GraphDecoder(model, 64, 3), GraphDecoder(model, 64, 3, graph=False)
    for kwargs in (dict(), dict(sample=True, temperature=1.3, seed=11), dict(sample=True, top_p=0.8, seed=12)):
        got = graph.generate(ids, 20, attention_mask=mask, **kwargs)
        assert torch.equal(got, eager.generate(ids, 20, attention_mask=mask, **kwargs)), kwargs
        assert torch.equal(got, graph.generate(ids, 20, attention_mask=mask, **kwargs)), kwargs
    assert len(graph._graphs) == 3
    alone = GraphDecoder(model, 64, 1).generate(ids[1:2, 6:], 20)  # row 1 without its padding: same start
    assert torch.equal(alone[0, 3:7], graph.generate(ids, 20, attention_mask=mask)[1, 9:13])
