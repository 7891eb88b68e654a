"""A running deployment seen from its home server (forward, generate, counters, close), and the home's model.

`deploy()` (deployment.py) builds one; a home besides the front (serve.py, several homes) runs one too.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.execution.routing import ExpertTables, Mode
from moecompress.runtime.edge.bundle import BundleInfo
from moecompress.runtime.edge.transport import InProcess, TorchDistributed


class Deployment:
    def __init__(self, model, info: BundleInfo, transport, counters: Counters, tokenizer=None, servers=None,
                 recorder: list | None = None, tokens=None):
        self.model, self.info, self.transport, self._counters = model, info, transport, counters
        self.tokenizer, self.servers, self.recorder = tokenizer, servers, recorder
        self.tokens = tokens  # dispatcher.TokenSettings when token policies are on
        self._closed = False
        self.calls: list[tuple[int, int, int]] = []  # (sequences, new tokens, keys attended) of every forward call
        self._hook = model.register_forward_pre_hook(self._count_call, with_kwargs=True)

    def _count_call(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self._counters.add_call(ids.numel())
        mask = kwargs.get("attention_mask")
        if self.tokens is not None:
            self.tokens.set_call(ids, mask, kwargs.get("position_ids"))
        self.calls.append((ids.shape[0], ids.shape[1], mask.shape[1] if mask is not None else ids.shape[1]))

    @property
    def home(self) -> int:
        return self.info.home

    def set_tokens(self, tokens=None, similarity=None) -> None:
        """Switch the token policies of the running deployment (the servers need nothing: every request says what
        it carries); None: off. The counters keep counting; see `reset_counters`."""
        from moecompress.runtime.edge.dispatcher import DispatchedExperts
        from moecompress.runtime.edge.tokens import resolve_pipeline, token_settings
        from moecompress.runtime.edge.tokens_copies import use_bundled_copies

        pipeline = resolve_pipeline(tokens)
        copies = use_bundled_copies(self.model, self.info, pipeline) if pipeline.policies else None
        settings = token_settings(self.info, pipeline, similarity, copies) if pipeline.policies else None
        for module in self.model.modules():
            if isinstance(module, DispatchedExperts):
                module.tokens = settings
        self.tokens = settings
        self._counters.token_policy = pipeline.spec

    def reset_counters(self) -> Counters:
        """Start counting afresh (the counts so far are returned); the servers' times and memory stay cumulative."""
        old = self._counters
        self._counters = Counters(old.num_servers, old.num_layers)
        self._counters.token_policy = old.token_policy
        for module in self.model.modules():
            if getattr(module, "counters", None) is old:
                module.counters = self._counters
        return old

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] of a batch (attention_mask: 1 for tokens, 0 for left padding)."""
        self._check_open()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._timed(lambda: self.model(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).logits)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
                 sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True) -> torch.Tensor:
        """Autoregressive decoding with the KV cache on the home (and on each stage): [B, S + new] token ids."""
        self._check_open()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if seed is not None:
            torch.manual_seed(seed)
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else (
            config.eos_token_id if isinstance(config.eos_token_id, int) else 0)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad, use_cache=True)
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if not stop_at_eos:
            kwargs.update(eos_token_id=None)
        return self._timed(lambda: self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def generate_text(self, prompts: list[str], **kwargs) -> list[str]:
        """Several prompts of different lengths in one left-padded batch; returns each prompt's continuation."""
        if self.tokenizer is None:
            raise MoecompressError(f"server {self.home}'s bundle has no tokenizer; pass token ids to generate()")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        ids = self.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
        return self.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def _timed(self, fn):
        exchange0 = getattr(self.transport, "exchange_seconds", 0.0)
        start = time.perf_counter()
        try:
            out = fn()
        except MoecompressError:  # a server died or stopped answering: stop the others, free the process group
            self._abort()
            raise
        wall = time.perf_counter() - start
        exchange = getattr(self.transport, "exchange_seconds", 0.0) - exchange0
        self._counters.add_time(self.home, exchange=exchange, compute=wall - exchange)
        return out

    @property
    def counters(self) -> Counters:
        """The counters so far, with every server's compute/exchange time and peak memory brought up to date."""
        from moecompress.runtime.edge.rank_model import peak_rss

        if not self._closed:
            for server, (compute, exchange, peak) in self.transport.gather_stats().items():
                self._counters.compute_seconds[server] = compute
                self._counters.exchange_seconds[server] = exchange
                self._counters.note_memory(server, int(peak))
            self._counters.note_memory(self.home, peak_rss())
        return self._counters

    def trace(self):
        """(experts [T, L, k], weights [T, L, k], calls) recorded by the dispatchers (expert model, deploy(...,
        record=True)); calls: (sequences, new tokens, keys attended) of every forward call, tokens in call order
        (padding positions included): what a replay needs to reproduce these counters."""
        if self.recorder is None:
            raise MoecompressError("this deployment records no routing; deploy it with record=True")
        L = len(self.info.experts_paths)
        per_call = [self.recorder[i:i + L] for i in range(0, len(self.recorder), L)]
        if not per_call:
            return None, None, list(self.calls)
        experts = torch.cat([torch.stack([ids for _, ids, _ in c], 1) for c in per_call])
        weights = torch.cat([torch.stack([w for _, _, w in c], 1) for c in per_call])
        return experts, weights, list(self.calls)

    def _check_open(self) -> None:
        if self._closed:
            raise MoecompressError("this deployment is closed")

    def close(self, before_group_ends=None) -> None:
        """Stop the servers and leave the process group. before_group_ends: called once the servers were told to
        stop, before the group is destroyed (several homes: the front's expert service ends then)."""
        if self._closed:
            return
        try:
            self.counters  # noqa: B018 -- last stats before the servers stop
        except MoecompressError:
            pass
        self._closed = True
        self._hook.remove()
        try:
            self.transport.close()
            if before_group_ends is not None:
                before_group_ends()
        finally:
            if self.servers is not None:
                self.servers.close()
            if not isinstance(self.transport, InProcess):
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()

    def _abort(self) -> None:
        self._closed = True
        self._hook.remove()
        if isinstance(self.transport, TorchDistributed):
            self.transport.abandon()
        if self.servers is not None:
            self.servers.close(grace=1.0)
        import torch.distributed as dist

        if not isinstance(self.transport, InProcess) and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def home_model(info: BundleInfo, dtype, transport, counters, recorder, settings=None, expert_budget=None,
               router_prefetch: bool = True):
    """The home's model of a bundle (expert model: dispatchers installed on `transport`; pipeline model: the home's
    stages) and its tokenizer (None without tokenizer files). router_prefetch: the store (expert_budget) predicts
    from the home's routers and residual stream; False (several homes, homes.py): from activation paths only, as a
    pure server's store does (the residual it keeps belongs to the home's own rows, not to the other homes' requests
    its experts answer meanwhile)."""
    from moecompress.runtime.edge.dispatcher import install_dispatchers
    from moecompress.runtime.edge.rank_model import load_full

    tokenizer = bundle_tokenizer(info.directory)
    if info.mode == Mode.PIPELINE:
        from moecompress.runtime.edge.pipeline import home_pipeline_model

        return home_pipeline_model(info, dtype, transport, counters), tokenizer
    model = load_full(info, dtype)
    if expert_budget is not None:  # the home's own experts under a store (runtime/store/)
        from moecompress.runtime.store.rank import attach_server_store, held_experts_modules

        attach_server_store(info.directory, held_experts_modules(model, info.experts_paths), info.experts_paths,
                            expert_budget, model if router_prefetch else None)
    install_dispatchers(model, info.experts_paths, ExpertTables.from_assignment(info.assignment, info.num_servers),
                        info.home, transport, counters, recorder, settings)
    if settings is not None:  # low-bit home copies, when the token policies compute on them (tokens_copies.py)
        from moecompress.runtime.edge.tokens_copies import settings_with_copies

        settings_with_copies(model, info, settings)
    return model, tokenizer


def bundle_tokenizer(directory: Path):
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
