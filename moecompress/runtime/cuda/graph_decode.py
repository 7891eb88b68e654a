"""Greedy generation with each one-token step replayed as one CUDA graph (no Python, no host sync per token).

On a GPU, a decode step of a small-batch MoE model is mostly Python: transformers' modules, the router's torch ops
and the Triton launches of every layer (hundreds of launches per token). `GraphDecoder` runs the prompt eagerly
into a transformers StaticCache, then captures ONE decode step (the model's forward, the argmax, the token written
into the output, the position advanced, all on the device) and replays it per token:

    from moecompress.runtime.cuda.graph_decode import GraphDecoder
    model = moecompress.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
    decoder = GraphDecoder(model, max_cache_len=2048)         # keep it: the graph is captured once, at first use
    ids = decoder.generate(input_ids, max_new_tokens=128)     # [B, prompt + new], like model.generate(greedy)

Works for any transformers causal LM whose forward takes a StaticCache (the packed experts' CUDA kernels are
capture-safe: runtime/cuda/experts.py). Greedy only; rows of a batch have no padding (same prompt length). On a
CPU, or with graph=False, the same steps run eagerly (what the tests compare on machines without CUDA).
"""
from __future__ import annotations

import inspect

import torch

from moecompress.errors import MoecompressError

EOS_CHECK_EVERY = 16  # tokens between the host's looks at the output for end-of-sequence tokens (one sync each)


def set_cache_length(cache, tokens: int) -> None:
    """Put a StaticCache at `tokens` cached tokens: its layers keep the count in a device tensor of their own
    (cumulative_length) that every update advances in place (warm-ups and graph replays too) and write there."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(tokens)
        elif isinstance(counter, int):
            layer.cumulative_length = tokens


class GraphDecoder:
    """Greedy decoding of `model` with a StaticCache of max_cache_len tokens and batch_size rows; each one-token
    step one CUDA graph replay (graph=None: on CUDA devices). Reusable across prompts of the same batch size."""

    def __init__(self, model, max_cache_len: int, batch_size: int = 1, graph: bool | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.graph = self.device.type == "cuda" if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise MoecompressError(f"GraphDecoder(graph=True) needs the model on a CUDA device, not {self.device}; "
                                   "use graph=False (eager steps) on other devices")
        self.max_cache_len, self.batch_size = max_cache_len, batch_size
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params  # transformers < 5.2x: positions also as cache_position
        self._logits_to_keep = "logits_to_keep" in params
        dev = self.device
        self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)  # the step's input token
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
        self._out = torch.zeros(batch_size, max_cache_len + 1, dtype=torch.long, device=dev)  # tokens by position
        self._cuda_graph = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {self._cache_kw: self.cache, "position_ids": positions[None], "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = positions
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1]  # [B, vocab]

    def _step(self) -> None:
        """One token: forward at self._pos, greedy pick, written at the next position (all on the device)."""
        nxt = self._forward(self._ids, self._pos).argmax(-1, keepdim=True)  # [B, 1]
        self._ids.copy_(nxt)
        self._pos.add_(1)
        self._out.index_copy_(1, self._pos, nxt)

    def _capture(self) -> None:
        """Warm up (Triton compiles, the cache's buffers are made) then capture one step; the warm-ups write at
        position 0, which the prompt overwrites."""
        def warm():
            set_cache_length(self.cache, 0)
            self._pos.zero_()
            self._step()

        warm()  # on the current stream: the StaticCache allocates its buffers here
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            warm()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._cuda_graph = graph

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """input_ids [B, n] -> [B, n + generated] (generated <= max_new_tokens; fewer when every row ended with an
        EOS token; after a row's EOS its tokens are pad_token_id, default the first EOS id, as transformers does)."""
        batch, n = input_ids.shape
        if batch != self.batch_size:
            raise MoecompressError(f"this GraphDecoder was made for batch_size={self.batch_size}, got {batch} rows")
        if max_new_tokens < 1 or n < 1 or n + max_new_tokens > self.max_cache_len:
            raise MoecompressError(f"prompt {n} + max_new_tokens {max_new_tokens} must fit max_cache_len="
                                   f"{self.max_cache_len} (and both be >= 1): make a GraphDecoder with a larger one")
        if self.graph and self._cuda_graph is None:
            self._capture()
        ids = input_ids.to(self.device)
        set_cache_length(self.cache, 0)
        logits = self._forward(ids, torch.arange(n, device=self.device))
        self._out[:, :n] = ids
        self._out[:, n] = logits.argmax(-1)
        self._ids.copy_(self._out[:, n:n + 1])
        self._pos.fill_(n)
        eos = ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)) if eos_token_id is not None \
            else []
        eos_t = torch.tensor(eos, device=self.device)
        done = 1
        while done < max_new_tokens:
            chunk = min(EOS_CHECK_EVERY, max_new_tokens - done)
            for _ in range(chunk):
                if self._cuda_graph is not None:
                    self._cuda_graph.replay()
                else:
                    self._step()
            done += chunk
            if eos and bool(torch.isin(self._out[:, n:n + done], eos_t).any(-1).all()):
                break
        out = self._out[:, :n + done].clone()
        if eos:  # tokens after a row's first EOS -> pad (transformers' greedy search does the same)
            hit = torch.isin(out[:, n:], eos_t).int().cumsum(-1)
            after = (hit - torch.isin(out[:, n:], eos_t).int()) > 0
            out[:, n:][after] = eos[0] if pad_token_id is None else pad_token_id
            ended = (hit > 0).all(0)
            if bool(ended.any()):  # drop the columns after every row has ended
                done = int(ended.int().argmax()) + 1
                out = out[:, :n + done]
        return out


def graph_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """One-off greedy generation with a fresh GraphDecoder (captures a graph per call: keep a GraphDecoder for
    repeated calls)."""
    decoder = GraphDecoder(model, input_ids.shape[1] + max_new_tokens, input_ids.shape[0])
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
