"""The pipeline model: each server runs a contiguous range of decoder layers with their own KV cache.

Stages are the servers of `layer_servers` in order; the first one is the home: it holds the embeddings, its
layers, the final norm and lm_head, and computes the logits. Per forward call of B sequences x S new tokens:
home -> stage 2 -> ... -> last stage -> home, one one-way hop each (N hops for N stages, 0 with one stage).
A hop to a stage carries a header, the hidden state [B, S, H] at the model dtype, the 2-D attention mask
[B, past + S] (int8: left padding) and the position ids [B, S] (int32); the stage rebuilds the causal mask and the
rotary embedding from them, runs its layers with its own cache (a call with past = 0 starts a new cache) and sends
the same message on; the last stage returns only the hidden state. Counters: counters.add_stage_hop /
add_stage_return with these sizes, and every MoE layer's routed pairs (B * S * k) on its layer's server.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.bundle import BundleInfo
from moecompress.runtime.edge.rank_model import decoder_container, decoder_layer, load_rank_model, peak_rss


def _layers_of(info: BundleInfo, server: int) -> list[int]:
    return [i for i, s in enumerate(info.layer_servers) if s == server]


def _mask_fn(config):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask


class StageServer:
    """A stage other than the home: its decoder layers, its rotary embedding and its part of the KV cache."""

    def __init__(self, info: BundleInfo, model: nn.Module):
        self.info, self.model = info, model
        self.container = decoder_container(info.experts_paths)
        self.layers = _layers_of(info, info.server)
        self.decoder = model.get_submodule(self.container)
        self.rotary = model.get_submodule(self.container.rpartition(".")[0] + ".rotary_emb"
                                          if "." in self.container else "rotary_emb")
        stages = list(info.stages)
        i = stages.index(info.server)
        self.next = stages[i + 1] if i + 1 < len(stages) else None
        self.cache = None
        self.compute_seconds = 0.0

    @classmethod
    def load(cls, info: BundleInfo, dtype: torch.dtype) -> "StageServer":
        layers = set(_layers_of(info, info.server))
        return cls(info, load_rank_model(info.directory, info.experts_paths, dtype, layers=layers, outer=False).eval())

    def handle(self, head: list[int], payload: torch.Tensor):
        from transformers import DynamicCache

        _, _, batch, seq, code, kv, hidden_size, past = head
        dtype = wire.dtype_of(code)
        hidden, mask, positions = wire.decode_stage(payload, batch, seq, kv, hidden_size, dtype)
        start = time.perf_counter()
        config = self.model.config
        if past == 0 or self.cache is None:
            self.cache = DynamicCache(config=config)
        with torch.no_grad():
            causal = _mask_fn(config)(config=config, inputs_embeds=hidden, attention_mask=mask, cache=self.cache,
                                      position_ids=positions, layer_idx=self.layers[0])
            rotary = self.rotary(hidden, position_ids=positions)
            for i in self.layers:
                hidden = self.decoder[i](hidden, attention_mask=causal, position_ids=positions, cache=self.cache,
                                         use_cache=True, position_embeddings=rotary)
        self.compute_seconds += time.perf_counter() - start
        if self.next is None:
            return [(self.info.home, None, wire.as_bytes(hidden))]
        first = _layers_of(self.info, self.next)[0]
        return [(self.next, wire.stage_header(first, batch, seq, kv, hidden_size, dtype, past),
                 wire.encode_stage(hidden, mask, positions))]

    def control(self, op: int) -> None:
        if op in (wire.OP_RESET, wire.OP_STOP):
            self.cache = None

    def stats(self) -> list[float]:
        return [self.compute_seconds, 0.0, float(peak_rss())]


class IdleServer:
    """A server of the deployment that holds no layer in the pipeline model: it only takes control messages."""

    def handle(self, head: list[int], payload: torch.Tensor):
        raise MoecompressError("a server holding no layer was sent work; the placement and the runtime disagree")

    def control(self, op: int) -> None:
        pass

    def stats(self) -> list[float]:
        return [0.0, 0.0, float(peak_rss())]


class Skip(nn.Module):
    """A decoder layer computed on another stage: the hidden state passes through unchanged here."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class RemoteStages(nn.Module):
    """At the home, in place of the first decoder layer of the second stage: sends the hidden state down the
    chain of stages and returns the last stage's output."""

    def __init__(self, info: BundleInfo, transport, counters: Counters, context: dict, top_k: int):
        super().__init__()
        self.info, self.transport, self.counters, self.context, self.top_k = info, transport, counters, context, top_k
        self.stages = [s for s in info.stages if s != info.home]
        self.firsts = [_layers_of(info, s)[0] for s in self.stages]

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        B, S, H = hidden_states.shape
        dtype, elem = hidden_states.dtype, hidden_states.dtype.itemsize
        mask = self.context.get("attention_mask")
        if mask is None:
            past = self.context.get("past", 0)
            mask = torch.ones(B, past + S, dtype=torch.long)
        kv = mask.shape[1]
        past = kv - S
        positions = (position_ids if position_ids is not None else torch.arange(past, kv)[None]).expand(B, S)
        payload = wire.encode_stage(hidden_states, mask, positions)
        self.transport.expect(self.stages[-1], B * S * H * elem)
        self.transport.request(self.stages[0], wire.stage_header(self.firsts[0], B, S, kv, H, dtype, past), payload)
        reply = self.transport.reply(self.stages[-1], B * S * H * elem)
        src = self.info.home
        for stage, first in zip(self.stages, self.firsts):
            self.counters.add_stage_hop(first, src, stage, B * S, H, elem, B * kv)
            src = stage
        self.counters.add_stage_return(len(self.info.layer_servers) - 1, src, self.info.home, B * S, H, elem)
        return wire.decode_rows(reply, B * S, H, dtype).reshape(B, S, H).to(hidden_states.device)


def home_pipeline_model(info: BundleInfo, dtype: torch.dtype, transport, counters: Counters) -> nn.Module:
    """The home's model: embeddings, its own layers, final norm and lm_head; the other layers go to the stages."""
    if not info.layer_servers or info.layer_servers[0] != info.home:
        raise MoecompressError(f"pipeline placement: the home ({info.home}) must hold the first decoder layer")
    mine = set(_layers_of(info, info.home))
    model = load_rank_model(info.directory, info.experts_paths, dtype, layers=mine, outer=True).eval()
    container = decoder_container(info.experts_paths)
    decoder = model.get_submodule(container)
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    context: dict = {}
    remote = [i for i in range(len(info.layer_servers)) if i not in mine]
    for n, i in enumerate(remote):
        decoder[i] = RemoteStages(info, transport, counters, context, top_k) if n == 0 else Skip()
    moe_layers = [decoder_layer(p, container) for p in info.experts_paths]

    def before_call(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        context["attention_mask"] = kwargs.get("attention_mask")
        tokens = ids.numel()
        for d in moe_layers:
            counters.add_stage_pairs(d, info.layer_servers[d], tokens * top_k)

    model.register_forward_pre_hook(before_call, with_kwargs=True)
    return model
