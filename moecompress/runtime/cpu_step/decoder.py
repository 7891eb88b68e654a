"""CpuDecoder: generation on CPU with each one-token step of the whole model in one C++ call (csrc/lowbit/step.cpp).

A batch-1 decode step of a small MoE model through transformers is mostly Python: ~60 small torch ops per layer
(norms, attention glue, router, the linears' dispatch). llama.cpp runs its graph without Python between ops; so does
this decoder. The prompt runs through the model's own forward (one call, fast enough; a bf16 / float16 model's
experts and attention linears through our float32-FMA GEMM on CPUs without native bf16, experts/cpu_prefill16.py),
its KV cache is copied into the step's float32 cache, then each new token is one `DecodeStep.forward` (all layers, the
logits) plus the pick;
greedy generation runs all its steps, argmax included, in one C++ call (`greedy_steps`):

    from moecompress.runtime.cpu_step import CpuDecoder
    model = moecompress.from_pretrained(directory, dtype=torch.bfloat16)
    decoder = CpuDecoder(model, max_cache_len=2048, batch_size=1)   # keep it: reusable across prompts
    ids = decoder.generate(input_ids, max_new_tokens=128)            # [B, prompt + new], like model.generate

The API mirrors runtime/cuda/graph_decode.GraphDecoder, plus left-padded batches (attention_mask, positions as
transformers' generate computes them) and sampling (runtime/sampling.pick_tokens: temperature, top-p, seed).
Numbers: float32 throughout the step; packed weights through the q8_* decode kernels (int8 activations, what a
bfloat16 model's decode takes anyway; a float32 model's transformers forward uses exact dequantized tiles unless
MOECOMPRESS_INT8_ACTIVATIONS=always). Models the step does not run raise plan.UnsupportedModel with the reason.
The first decoder of a model moves the weights the step streams (StepPlan.streamed, 64 MB or more of them) from the
checkpoint's file mapping onto 2 MB pages (kernels/huge_pages.py; the same resident memory, read faster; ~1-2 s for
1.3 GB; MOECOMPRESS_HUGE_PAGES=0: off).
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.experts.cpu_prefill16 import Gemm16Prefill
from moecompress.runtime.kernels import cpu_lowbit, heap, huge_pages
from moecompress.runtime.loading.file_pages import release_unused
from moecompress.runtime.cpu_step.plan import MAX_BATCH, QK_NORM_ID, StepPlan, UnsupportedModel
from moecompress.runtime.sampling import check_request, pick_tokens


def on_huge_pages(model, plan: StepPlan) -> int:
    """Move the weights the step streams (the model's own tensor objects, so that its forward reads them there too)
    onto huge pages once per model (kernels/huge_pages.py) -> bytes moved by this call. Then, also once per model,
    drop the checkpoint's file pages that no tensor views any more (loading/file_pages.py): an unquantized model's
    experts, which transformers copies into fused tensors at load, stay resident in the file mapping otherwise
    (every expert byte counted twice in the process's RSS)."""
    if huge_pages.ATTR in model.__dict__:
        return 0
    wanted = {t.data_ptr() for t in plan.streamed()}
    own = [t for t in (*model.parameters(), *model.buffers()) if t.data_ptr() in wanted]
    moved = huge_pages.move(model, own)
    release_unused(model)
    return moved


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as transformers' generate makes them: cumsum - 1, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class CpuDecoder:
    """Decoding of `model` on CPU with a float32 KV cache of max_cache_len tokens and batch_size (<= 8) rows; each
    one-token step of every row one C++ call. Raises UnsupportedModel for a model the step does not run."""

    def __init__(self, model, max_cache_len: int, batch_size: int = 1):
        if not 1 <= batch_size <= MAX_BATCH:
            raise MoecompressError(f"CpuDecoder: batch_size {batch_size}; the step takes 1 to {MAX_BATCH} rows")
        if max_cache_len < 2:
            raise MoecompressError(f"CpuDecoder: max_cache_len {max_cache_len} < 2")
        self.model, self.plan = model, StepPlan.of(model)
        if on_huge_pages(model, self.plan):  # the plan's detached aliases of moved weights: read them again
            self.plan = StepPlan.of(model)
        p = self.plan
        if p.sliding_window is not None and p.sliding_window < max_cache_len:
            raise UnsupportedModel(f"the CPU decode step does not run this model: sliding window {p.sliding_window} "
                                   f"< max_cache_len {max_cache_len} (the step attends to the whole cache)")
        self.max_cache_len, self.batch_size = max_cache_len, batch_size
        layers = len(p.layers)
        shape = (layers, batch_size, p.kv_heads, max_cache_len, p.head_dim)  # float32
        self.k_cache, self.v_cache = heap.mapped_zeros(shape), heap.mapped_zeros(shape)  # returned whole when freed
        self.mask = torch.zeros(batch_size, max_cache_len, dtype=torch.uint8)
        cos, sin = p.rope_tables(max_cache_len)
        mod = cpu_lowbit._module()
        self.step = mod.DecodeStep(p.heads, p.kv_heads, p.head_dim, p.top_k, p.renormalize, p.eps, p.scaling,
                                   p.clip_qkv, QK_NORM_ID[p.qk_norm], p.embed, p.final_norm, p.head.build(p.simd),
                                   cos, sin, self.k_cache, self.v_cache, self.mask)
        empty = torch.empty(0)
        for layer in p.layers:
            fused = layer.experts
            self.step.add_layer(
                *(lin.build(p.simd) for lin in (layer.q, layer.k, layer.v, layer.o, layer.router)),
                layer.input_norm, layer.post_norm,
                empty if layer.q_norm is None else layer.q_norm, empty if layer.k_norm is None else layer.k_norm,
                *fused.args, fused.group_size, cpu_lowbit.ISA_ID[fused.isa], [s.build(p.simd) for s in layer.shared])

    # -- the two halves of a generation: the prompt through transformers, then the C++ steps ------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through the model's forward; its KV cache copied into the step's. -> (last logits [B, V]
        float32, positions [B, n])."""
        n = input_ids.shape[1]
        positions = prompt_positions(attention_mask)
        with Gemm16Prefill(self.model):  # 16-bit experts / attention linears through our GEMM where bf16 is slow
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for i, layer in enumerate(cache.layers):
            self.k_cache[i, :, :, :n].copy_(layer.keys)
            self.v_cache[i, :, :, :n].copy_(layer.values)
        self.mask.zero_()
        self.mask[:, :n] = attention_mask.to(torch.uint8)
        logits = out.logits[:, -1].float()
        del out, cache
        if input_ids.numel() >= heap.TRIM_MIN_TOKENS:  # the prompt's own KV cache, freed now (heap.py)
            heap.trim()
        return logits, positions

    def step_logits(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """One token per row (ids [B]) at RoPE positions [B], written at cache slot `slot` -> logits float32 [B, V]."""
        return self.step.forward(ids.long().contiguous(), positions.long().contiguous(), slot)

    def greedy_steps(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, steps: int,
                     eos: list[int] | None = None) -> torch.Tensor:
        """`steps` greedy steps in one C++ call (no Python between them): step s reads ids [B] (then the previous
        step's argmax) at positions + s, cache slot slot + s. -> the argmax tokens [B, taken], taken < steps only
        where every row produced one of `eos`."""
        return self.step.greedy(ids.long().contiguous(), positions.long().contiguous(), slot, steps, list(eos or []))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """input_ids [B, n] (left-padded where attention_mask has zeros) -> [B, n + generated] (generated <=
        max_new_tokens; fewer when every row ended with an EOS token; after a row's EOS its tokens are pad_token_id,
        default the first EOS id, as transformers does). Greedy, or sampled at temperature / top_p with `seed`."""
        batch, n = input_ids.shape
        check_request("CpuDecoder", self.batch_size, self.max_cache_len, input_ids, max_new_tokens, sample,
                      temperature, top_p)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, dtype=torch.long)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        knobs = dict(temperature=torch.tensor([float(temperature)]),
                     top_p=torch.tensor([float(top_p)]) if top_p < 1 else None, generator=generator) if sample else {}
        logits, positions = self.prefill(input_ids, mask)
        position = positions[:, -1].clone()
        if not sample:
            return self._greedy(input_ids, logits, position, max_new_tokens, eos, pad)
        out = [input_ids]
        done = torch.zeros(batch, dtype=torch.bool)
        for t in range(max_new_tokens):
            if t:
                position += 1
                logits = self.step_logits(nxt, position, n + t - 1)
            nxt = pick_tokens(logits, sample, **knobs)[:, 0]  # what the next step reads (finished rows too)
            token = nxt
            if eos:
                token = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= torch.isin(token, eos_t)
            out.append(token[:, None])
            if eos and bool(done.all()):
                break
        return torch.cat(out, 1)

    def _greedy(self, input_ids, logits, position, max_new_tokens: int, eos: list[int], pad: int) -> torch.Tensor:
        """generate's greedy path: the first token from the prompt's logits, the rest in one C++ loop; after a row's
        EOS its tokens become pad (as transformers does)."""
        if max_new_tokens == 0:
            return input_ids
        first = pick_tokens(logits, False)[:, :1]
        tokens = first
        if max_new_tokens > 1 and not (eos and bool(torch.isin(first, torch.tensor(eos)).all())):
            rest = self.greedy_steps(first[:, 0], position + 1, input_ids.shape[1], max_new_tokens - 1, eos)
            tokens = torch.cat([first, rest], 1)
        if eos:  # tokens after a row's first EOS: pad
            hit = torch.isin(tokens, torch.tensor(eos)).long()
            after = (hit.cumsum(1) - hit) > 0
            tokens = tokens.masked_fill(after, pad)
        return torch.cat([input_ids, tokens], 1)


def cpu_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """One-off generation with a fresh CpuDecoder (keep a CpuDecoder for repeated calls)."""
    decoder = CpuDecoder(model, input_ids.shape[1] + max_new_tokens, input_ids.shape[0])
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
