"""GraphDecoder (runtime/cuda/graph_decode.py): greedy tokens equal transformers' own greedy loop.

On the CPU the StaticCache steps run eagerly (what the graph captures); with CUDA, a tiny Qwen3-MoE model whose
experts are packed 2/3/4/8-bit (the Triton kernels) decodes with graph replays and gives the same tokens as the
same steps run eagerly and as a DynamicCache loop.
"""
from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.runtime import cuda
from moecompress.runtime.cuda.graph_decode import GraphDecoder, set_cache_length


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


@pytest.mark.skipif(not cuda.available(), reason=f"CUDA graph decode: {cuda.unavailable_reason()}")
@pytest.mark.parametrize("batch", [1, 2])
def test_graph_replay_tokens_equal_eager_with_packed_experts(batch):
    """bf16 on CUDA, every MoE layer's experts packed at 2/3/4/8 bits (the Triton pair path): graph-replayed
    greedy tokens == the same steps run eagerly (twice: the graph is reused), and start like a DynamicCache loop."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cuda_kernels import random_experts

    model = tiny_qwen3_moe("cuda", torch.bfloat16)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts = random_experts(8, 128, 64, [2, 3, 4, 8, 3, 2, 4, 3], group_size=32, device="cuda",
                                           template=layer.mlp.experts, seed=i)
    ids = torch.randint(0, 512, (batch, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    graph = GraphDecoder(model, 64, batch)
    first = graph.generate(ids, 24)
    again = graph.generate(ids, 24)  # the captured graph reused for a second call
    eager = GraphDecoder(model, 64, batch, graph=False).generate(ids, 24)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    # a DynamicCache attends over fewer positions (other bf16 roundings): the first tokens agree
    assert torch.equal(eager[:, :13], dynamic_greedy(model, ids, 4))
