"""Bundles for the edge runtime tests: one tiny quantized checkpoint per session, split by hand-made placements."""
from __future__ import annotations

import torch
from helpers import quantize_tiny

import moecompress
from moecompress.artifacts.placement import Placement
from moecompress.export.checkpoint import export_checkpoint
from moecompress.shard.bundles import write_bundles
from moecompress.shard.command import checkpoint_sizes
from moecompress.runtime.edge import deploy

IDS = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(7))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding: sequences of different lengths in one batch
MASK[2, :6] = 0
NEW_TOKENS = 4
_BUILT: dict = {}


def checkpoint(tmp_path_factory):
    """(checkpoint dir, reference logits [3, 10, V], reference greedy tokens) of a 3-layer tiny qwen3_moe, float32."""
    if "ck" not in _BUILT:
        from conftest import _build

        ck = tmp_path_factory.mktemp("edge") / "ck"
        model = _build("qwen3_moe")
        layout, plan, quantized = quantize_tiny(model)
        export_checkpoint(model, layout, plan, quantized, ck, tokenizer=char_tokenizer(), dtype=torch.float32)
        full = moecompress.from_pretrained(ck, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = full(input_ids=IDS, attention_mask=MASK).logits
            tokens = full.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
        _BUILT["ck"] = (ck, logits, tokens)
    return _BUILT["ck"]


def char_tokenizer():
    """One token per character (printable ASCII) in the tiny model's 128-token vocabulary; 0 pads, 1 ends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(32 + i): 3 + i for i in range(95)}}
    vocab.update({f"<x{i}>": i for i in range(98, 128)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def expert_bundles(ck, out, servers: int, dense=(0,)):
    """Experts dealt round-robin with a replica of every third expert on the next server; dense weights on `dense`."""
    expert_bytes, dense_bytes = checkpoint_sizes(ck)
    L, E = expert_bytes.shape
    grid = tuple(tuple(((e + l) % servers,) + (((e + l + 1) % servers,) if e % 3 == 0 else ()) for e in range(E))
                 for l in range(L))
    write_bundles(ck, Placement(memory_bytes=(10**9,) * servers, assignment=grid,
                                expert_bytes=tuple(tuple(int(b) for b in row) for row in expert_bytes),
                                dense_bytes=int(dense_bytes), dense_servers=tuple(dense)), out)
    return out


def pipeline_bundles(ck, out, layer_servers: tuple[int, ...], servers: int):
    """Decoder layer i (and its experts) on layer_servers[i]; the home (first stage) also embeddings and lm_head."""
    expert_bytes, dense_bytes = checkpoint_sizes(ck)
    L, E = expert_bytes.shape
    write_bundles(ck, Placement(memory_bytes=(10**9,) * servers,
                                assignment=tuple(tuple((layer_servers[l],) for _ in range(E)) for l in range(L)),
                                expert_bytes=tuple(tuple(int(b) for b in row) for row in expert_bytes),
                                dense_bytes=int(dense_bytes), dense_servers=tuple(sorted(set(layer_servers))),
                                mode="pipeline", layer_servers=layer_servers,
                                server_dense_bytes=(int(dense_bytes),) * servers), out)
    return out


def run_calls(d):
    """The same calls on any deployment: one forward, one greedy generation -> (logits, tokens, exact counts)."""
    logits = d(IDS, MASK)
    tokens = d.generate(IDS, MASK, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return logits, tokens, d.counters.counts()


def processes_equal_simulation(out, ref_logits, ref_tokens):
    """Run the bundles in OUT simulated and as real processes: both give the reference outputs (float32, 1e-5) and
    the real run counts exactly what the simulation counts. Returns the real run's counters."""
    with deploy(out, simulate=True) as d:
        _, _, sim_counts = run_calls(d)
    with deploy(out, simulate=False, timeout=60) as d:
        logits, tokens, counts = run_calls(d)
        counters = d.counters
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counts == sim_counts
    return counters
