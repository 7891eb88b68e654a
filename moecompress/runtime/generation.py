"""Generation from one checkpoint (`moecompress generate --model`): the fastest decoder that runs the model here.

- CPU: CpuDecoder (runtime/cpu_step/), every decode step of the whole model one C++ call;
- CUDA: GraphDecoder (runtime/cuda/graph_decode.py), every decode step one CUDA graph replay;
- else, or where that decoder refuses the model or the request: transformers' own `generate`, the reason logged.

`pick_decoder` makes the choice (a plain list of candidates, first that takes the call wins); `generate_ids` runs
it; `generate_text` tokenizes (one left-padded batch), generates and decodes.
"""
from __future__ import annotations

import logging

import torch

from moecompress.errors import MoecompressError

log = logging.getLogger(__name__)


def _cpu(model, batch: int, cache_len: int, request: dict):
    from moecompress.runtime.cpu_step import CpuDecoder

    if next(model.parameters()).device.type != "cpu":
        return None, "the model is not on the CPU"
    return CpuDecoder(model, cache_len, batch), ""


def _cuda(model, batch: int, cache_len: int, request: dict):
    if next(model.parameters()).device.type != "cuda":
        return None, "the model is not on a CUDA device"
    from moecompress.runtime.cuda.graph_decode import GraphDecoder, mask_kind

    if request["attention_mask"] and mask_kind(model) is None:
        return None, (f"padded batches need sdpa or eager attention, not {model.config._attn_implementation}")
    return GraphDecoder(model, cache_len, batch), ""


DECODERS = {"cpu_step": _cpu, "cuda_graph": _cuda}  # name -> (model, batch, cache_len, request) -> (decoder, reason)


def pick_decoder(model, batch: int, cache_len: int, request: dict) -> tuple[object | None, str, str]:
    """(decoder or None, its name or "transformers", the reasons the others did not take the call)."""
    reasons = []
    for name, make in DECODERS.items():
        try:
            decoder, reason = make(model, batch, cache_len, request)
        except MoecompressError as exc:  # UnsupportedModel and other refusals: the next candidate
            decoder, reason = None, str(exc)
        if decoder is not None:
            return decoder, name, ""
        reasons.append(f"{name}: {reason}")
    return None, "transformers", "; ".join(reasons)


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id=None, pad_token_id: int | None = None, sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> tuple[torch.Tensor, str]:
    """-> (ids [B, n + generated], the decoder's name)."""
    padded = bool((attention_mask == 0).any())
    request = {"attention_mask": padded, "sample": sample}
    decoder, name, why = pick_decoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, request)
    device = next(model.parameters()).device
    if decoder is not None:
        kwargs = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if padded:
            kwargs["attention_mask"] = attention_mask.to(device)
        if sample:
            kwargs.update(sample=True, temperature=temperature, top_p=top_p, seed=seed)
        return decoder.generate(input_ids.to(device), max_new_tokens, **kwargs), name
    log.warning("moecompress generate: transformers' generate (%s)", why)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
    return out, name


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, **kwargs) -> tuple[list[str], str]:
    """Continuations of `prompts` (one left-padded batch) -> (texts, the decoder's name)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, name = generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    n = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[n:].tolist(), skip_special_tokens=True) for row in ids.cpu()], name


def run_model(directory: str, prompts: list[str], max_new_tokens: int = 32, dtype: str = "float32",
              tokenizer: str | None = None, device: str = "cpu", **kwargs) -> list[str]:
    """`moecompress generate --model`: load one checkpoint, print one JSON line per prompt (and the decoder used,
    with its speed, on stderr)."""
    import json
    import sys
    import time

    from transformers import AutoTokenizer

    from moecompress.runtime.loading.load import from_pretrained

    if max_new_tokens < 1:
        raise MoecompressError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    load_kwargs = {} if device == "cpu" else {"device_map": device}
    model = from_pretrained(directory, dtype=getattr(torch, dtype), **load_kwargs).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer or directory)
    t0 = time.perf_counter()
    texts, name = generate_text(model, tok, prompts, max_new_tokens, **kwargs)
    seconds = time.perf_counter() - t0
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "continuation": text}, ensure_ascii=False))
    print(f"decoder: {name}, {seconds:.2f} s for {len(prompts)} x <= {max_new_tokens} new tokens (prefill included)",
          file=sys.stderr)
    return texts
