"""Generation with each one-token step replayed as one CUDA graph (no Python, no host sync per token).

On a GPU, a decode step of a small-batch MoE model is mostly Python: transformers' modules, the router's torch ops
and the Triton launches of every layer (hundreds of launches per token). `GraphDecoder` runs the prompt eagerly
into a transformers StaticCache, then captures ONE decode step (the model's forward, the next token picked, written
into the output, the positions advanced, all on the device) and replays it per token:

    from moecompress.runtime.cuda.graph_decode import GraphDecoder
    model = moecompress.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
    decoder = GraphDecoder(model, max_cache_len=2048, batch_size=4)   # keep it: each mode is captured once
    ids = decoder.generate(input_ids, max_new_tokens=128, attention_mask=mask,         # [B, prompt + new],
                           sample=True, temperature=0.7, top_p=0.9, seed=0)            # like model.generate

Prompts of different lengths come left-padded with their attention_mask (1 = token, 0 = padding, as a tokenizer
with padding_side="left" gives them): each row's positions count its own tokens and no token attends to padding
(the step passes its own 4-D mask for sdpa- and eager-style attention). Greedy (argmax) or sampling (temperature,
top-p; sampling.py): the draw happens on the device from a generator of the decoder's own, seeded by `seed`.
Works for any transformers causal LM whose forward takes a StaticCache (the packed experts' CUDA kernels are
capture-safe: runtime/cuda/experts.py). On a CPU, or with graph=False, the same steps run eagerly (what the tests
compare on machines without CUDA).
"""
from __future__ import annotations

import inspect
import secrets

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.sampling import check_request, pick_tokens

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


def mask_kind(model) -> str | None:
    """How the model's attention takes a ready 4-D mask: "bool" (sdpa: True = attend), "float" (eager: added to the
    scores), None (other implementations, e.g. flash attention: no padded batches, steps without a mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    try:
        fn = ALL_MASK_ATTENTION_FUNCTIONS[getattr(model.config, "_attn_implementation", None) or "sdpa"]
    except KeyError:
        return None
    name = getattr(fn, "__name__", "")
    return "bool" if name.startswith("sdpa_mask") else "float" if name.startswith("eager_mask") else None


class GraphDecoder:
    """Decoding of `model` with a StaticCache of max_cache_len tokens and batch_size rows; each one-token step one
    CUDA graph replay (graph=None: on CUDA devices). Reusable across prompts of the same batch size; a graph is
    captured per mode (greedy, sampling, sampling with top-p) at its first use."""

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
        self._mask_kind = mask_kind(model)
        self._dtype = next(model.parameters()).dtype
        dev, rows = self.device, batch_size
        self._ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # the step's input token
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its cache slot (the same for every row)
        self._row_pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # its position: the row's tokens before it
        self._out = torch.zeros(rows, max_cache_len + 1, dtype=torch.long, device=dev)  # tokens by cache slot
        self._attend = torch.ones(rows, max_cache_len, dtype=torch.bool, device=dev)  # False: a padding slot
        self._slots = torch.arange(max_cache_len, device=dev)
        self._temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self._top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self._generator = torch.Generator(dev)
        self._graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}

    def _mask(self, queries: torch.Tensor) -> torch.Tensor | None:
        """The 4-D mask [B, 1, q, max_cache_len] of queries at cache slots `queries` [q]: earlier or same slots
        that are no padding, and each query's own slot (a padding query attends to itself: no empty row)."""
        if self._mask_kind is None:
            return None
        slots = self._slots[None, :]
        allowed = (slots <= queries[:, None]) & self._attend[:, None, :] | (slots == queries[:, None])  # [B, q, L]
        if self._mask_kind == "bool":
            return allowed[:, None]
        return torch.zeros(allowed.shape, dtype=self._dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self._dtype).min)[:, None]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask) -> torch.Tensor:
        kwargs = {self._cache_kw: self.cache, "position_ids": positions, "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = slots
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1]  # [B, vocab]

    def _pick(self, logits: torch.Tensor, mode: tuple[bool, bool]) -> torch.Tensor:
        sample, top_p = mode
        return pick_tokens(logits, sample, self._temperature, self._top_p if top_p else None, self._generator)

    def _step(self, mode: tuple[bool, bool]) -> None:
        """One token: forward at self._pos, next token picked and written at the next slot (all on the device)."""
        nxt = self._pick(self._forward(self._ids, self._row_pos, self._pos, self._mask(self._pos)), mode)  # [B, 1]
        self._ids.copy_(nxt)
        self._pos.add_(1)
        self._row_pos.add_(1)
        self._out.index_copy_(1, self._pos, nxt)

    def _capture(self, mode: tuple[bool, bool]) -> torch.cuda.CUDAGraph:
        """Warm up (Triton compiles, the cache's buffers are made) then capture one step; the warm-ups write at
        slot 0, which the prompt overwrites."""
        def warm():
            set_cache_length(self.cache, 0)
            self._pos.zero_()
            self._row_pos.zero_()
            self._step(mode)

        warm()  # on the current stream: the StaticCache allocates its buffers here
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            warm()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        if mode[0] and self._generator is not torch.cuda.default_generators[self.device.index or 0]:
            try:  # replays draw from the decoder's generator: its state advances per replay
                graph.register_generator_state(self._generator)
            except (AttributeError, RuntimeError):  # an older torch: the device's default generator (registered)
                self._generator = torch.cuda.default_generators[self.device.index or 0]
        with torch.cuda.graph(graph):
            self._step(mode)
        return graph

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mode) -> int:
        """Run the prompt (left-padded rows: attention_mask) into the cache and pick the first token; -> n."""
        batch, n = input_ids.shape
        ids = input_ids.to(self.device)
        self._attend.fill_(True)
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if padded:
            if self._mask_kind is None:
                raise MoecompressError(
                    f"padded batches need sdpa or eager attention (this model: {self.model.config._attn_implementation}"
                    "); load it with attn_implementation='sdpa', or give prompts of one length without padding")
            mask = attention_mask.to(self.device).bool()
            if mask.shape != ids.shape or not bool(mask[:, -1].all()):
                raise MoecompressError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)} "
                                       "with left padding (every row ends with a token; padding_side='left')")
            self._attend[:, :n] = mask
            positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)  # as transformers' generate
        else:
            positions = torch.arange(n, device=self.device).expand(batch, n)
        set_cache_length(self.cache, 0)
        slots = self._slots[:n]
        logits = self._forward(ids, positions, slots, self._mask(slots) if padded else None)
        self._out[:, :n] = ids
        self._out[:, n] = self._pick(logits, mode)[:, 0]
        self._ids.copy_(self._out[:, n:n + 1])
        self._pos.fill_(n)
        self._row_pos.copy_(positions[:, -1:] + 1)
        return n

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """input_ids [B, n] (left-padded rows with attention_mask [B, n], 1 = token) -> [B, n + generated]
        (generated <= max_new_tokens; fewer when every row ended with an EOS token; after a row's EOS its tokens are
        pad_token_id, default the first EOS id, as transformers does). sample: draw from softmax(logits /
        temperature) within the top-p nucleus (seed: the draws repeat; None: a fresh seed), else greedy."""
        batch, n = input_ids.shape
        check_request("GraphDecoder", self.batch_size, self.max_cache_len, input_ids, max_new_tokens, sample,
                      temperature, top_p)
        mode = (bool(sample), bool(sample) and top_p < 1)
        if self.graph and mode not in self._graphs:
            self._graphs[mode] = self._capture(mode)
        graph = self._graphs.get(mode)
        if sample:  # after a capture: the same draws whether or not this call captured
            self._temperature.fill_(temperature)
            self._top_p.fill_(top_p)
            self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        n = self._start(input_ids, attention_mask, mode)
        eos = ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)) if eos_token_id is not None \
            else []
        eos_t = torch.tensor(eos, device=self.device)
        done = 1
        while done < max_new_tokens:
            chunk = min(EOS_CHECK_EVERY, max_new_tokens - done)
            for _ in range(chunk):
                if graph is not None:
                    graph.replay()
                else:
                    self._step(mode)
            done += chunk
            if eos and bool(torch.isin(self._out[:, n:n + done], eos_t).any(-1).all()):
                break
        out = self._out[:, :n + done].clone()
        if eos:  # tokens after a row's first EOS -> pad (transformers' generate does the same)
            hit = torch.isin(out[:, n:], eos_t).int().cumsum(-1)
            after = (hit - torch.isin(out[:, n:], eos_t).int()) > 0
            out[:, n:][after] = eos[0] if pad_token_id is None else pad_token_id
            ended = (hit > 0).all(0)
            if bool(ended.any()):  # drop the columns after every row has ended
                done = int(ended.int().argmax()) + 1
                out = out[:, :n + done]
        return out


def graph_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """One-off generation with a fresh GraphDecoder (captures a graph per call: keep a GraphDecoder for repeated
    calls); kwargs as GraphDecoder.generate."""
    decoder = GraphDecoder(model, input_ids.shape[1] + max_new_tokens, input_ids.shape[0])
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
