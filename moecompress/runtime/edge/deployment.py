"""A running deployment seen from its home server: forward, generate, counters, close.

`deploy(OUT, simulate=True)` runs every server in this process (N virtual servers, each built from its own bundle
only, exchanging the same bytes); `simulate=False` starts the other servers as local processes over
torch.distributed, or, under torchrun (RANK / WORLD_SIZE set), joins the group started there as the home rank.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.execution.routing import ExpertTables, Mode
from moecompress.runtime.edge.bundle import BundleInfo, placement_doc, read_bundle
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

        pipeline = resolve_pipeline(tokens)
        settings = token_settings(self.info, pipeline, similarity) if pipeline.policies else None
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

    def close(self) -> None:
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


def deploy(out: str | Path, simulate: bool = True, servers: int | None = None, dtype: torch.dtype = torch.float32,
           timeout: float = 60.0, record: bool = False, verify: bool = True, tokens=None,
           similarity=None, homes=None, expert_budget: int | None = None) -> Deployment:
    """Run the bundles in `out` (a `moecompress shard` output) as one model, this process being the home server.

    simulate: all servers in this process (InProcess transport), else one gloo process per server (started here,
    or, under torchrun, already started: this must then be the home's rank). servers: the expected number (another
    is refused). timeout: seconds after which a silent server is named and the deployment stopped (also the gloo
    timeout). record: keep the routing of every call for `Deployment.trace()` (expert model). verify: check the
    bundle files' sha256 against their manifests. tokens: token policies of the expert model (a spec string such as
    "int8+protect:first=4+prune_server:threshold=0.2", a recipe YAML file with a `tokens` section, a list or dict,
    or a TokenPipeline; see execution/tokens/policy.py; None: off, the lossless exchange). similarity: [L, E, E]
    expert similarity for the `substitute` policy (a tensor or a file, see `token_settings`). Use as a context
    manager, or call close(). homes: several servers admitting requests (expert model, dense weights on each of
    them; sequences spread round robin, the first home is this process; see homes.py): a HomesDeployment.
    expert_budget: bytes of experts each server keeps in memory, the rest read from its bundle on use (expert
    model; runtime/store/); None: all resident.
    """
    from moecompress.runtime.edge.tokens import resolve_pipeline

    if homes is not None and len(set(homes)) > 1:
        return _deploy_homes(Path(out), tuple(int(h) for h in homes), simulate, servers, dtype, timeout, record,
                             verify, tokens, expert_budget)

    pipeline = resolve_pipeline(tokens)  # a bad spec is refused before anything starts
    out = Path(out)
    doc, _ = placement_doc(out)
    num_servers = len(doc["memory_bytes"])
    if servers is not None and servers != num_servers:
        raise MoecompressError(f"the placement in {out} has {num_servers} servers, not {servers}")
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and not simulate
    world = int(os.environ["WORLD_SIZE"]) if torchrun else num_servers
    home_guess = doc.get("home")
    if home_guess is None:
        home_guess = (doc.get("layer_servers") or doc["dense_servers"])[0]
    if torchrun and int(os.environ["RANK"]) != int(home_guess):
        raise MoecompressError(f"rank {os.environ['RANK']} is not the home ({home_guess}); start it with "
                               "`moecompress run`, which serves requests on non-home ranks")
    info = read_bundle(out, int(home_guess), world_size=world, verify=verify)
    if expert_budget is not None and info.mode != Mode.EXPERT:
        raise MoecompressError("expert_budget needs expert-model bundles (`moecompress shard` in expert mode); "
                               f"{out} is a {info.mode.value} deployment")
    counters = Counters(num_servers, _counted_layers(info))
    recorder = [] if record else None
    settings = None
    if pipeline.policies:
        from moecompress.runtime.edge.tokens import token_settings

        settings = token_settings(info, pipeline, similarity)
        counters.token_policy = pipeline.spec
    launched = None
    if simulate:
        from moecompress.runtime.edge.serve import build_handler

        handlers = {n: build_handler(read_bundle(out, n, world_size=num_servers, verify=verify), dtype, expert_budget)
                    for n in range(num_servers) if n != info.home}
        transport = InProcess(info.home, handlers, num_servers)
    else:
        import torch.distributed as dist

        from moecompress.runtime.edge.launch import LocalServers

        if torchrun:
            init, watch = "env://", None
        else:
            launched = LocalServers(out, num_servers, info.home, timeout, str(dtype).removeprefix("torch."),
                                    expert_budget=expert_budget)
            launched.wait_ready(load_timeout=max(timeout, 600.0))  # a first load may compile kernels
            init, watch = launched.init_method, launched.watch
        from moecompress.runtime.edge.transport import init_group

        try:
            device = init_group(init, info.home, num_servers, timeout)  # gloo on CPU, NCCL on CUDA
        except RuntimeError as exc:
            if launched is not None:
                launched.close(grace=1.0)
            raise MoecompressError(f"the servers did not all join within {timeout:g} s ({exc})") from exc
        downstream, chain_end = _downstream(info)
        transport = TorchDistributed(info.home, num_servers, timeout, device, watch, downstream, chain_end)
    try:
        model, tokenizer = _home_model(info, dtype, transport, counters, recorder, settings, expert_budget)
    except BaseException:
        transport.close()
        if launched is not None:
            launched.close()
        raise
    return Deployment(model, info, transport, counters, tokenizer, launched, recorder, settings)


def _counted_layers(info: BundleInfo) -> int:
    """Counters' layer axis: MoE layers in the expert model, decoder layers in the pipeline model."""
    return len(info.layer_servers) if info.mode == Mode.PIPELINE else len(info.experts_paths)


def _downstream(info: BundleInfo) -> tuple[list[int], dict[int, int]]:
    others = [n for n in range(info.num_servers) if n != info.home]
    if info.mode == Mode.EXPERT:
        return others, {}
    stages = [s for s in info.stages if s != info.home]
    idle = [n for n in others if n not in stages]
    return (stages[:1] + idle), ({stages[0]: stages[-1]} if stages else {})


def _home_model(info: BundleInfo, dtype, transport, counters, recorder, settings=None, expert_budget=None):
    from moecompress.runtime.edge.dispatcher import install_dispatchers
    from moecompress.runtime.edge.rank_model import load_full

    tokenizer = _tokenizer(info.directory)
    if info.mode == Mode.PIPELINE:
        from moecompress.runtime.edge.pipeline import home_pipeline_model

        return home_pipeline_model(info, dtype, transport, counters), tokenizer
    model = load_full(info, dtype)
    if expert_budget is not None:  # the home's own experts under a store (runtime/store/)
        from moecompress.runtime.store.rank import attach_server_store, held_experts_modules

        attach_server_store(info.directory, held_experts_modules(model, info.experts_paths), info.experts_paths,
                            expert_budget, model)
    install_dispatchers(model, info.experts_paths, ExpertTables.from_assignment(info.assignment, info.num_servers),
                        info.home, transport, counters, recorder, settings)
    return model, tokenizer


def _tokenizer(directory: Path):
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _deploy_homes(out: Path, homes: tuple[int, ...], simulate: bool, servers, dtype, timeout: float, record: bool,
                  verify: bool, tokens, expert_budget: int | None = None):
    """deploy(..., homes=...): every home's model (simulation) or the front's and the other homes' processes.
    expert_budget: every server's own experts (homes' too) under a store of that many bytes."""
    from moecompress.runtime.edge.homes import HomesDeployment, RemoteHome, home_server

    doc, _ = placement_doc(out)
    num_servers = len(doc["memory_bytes"])
    if servers is not None and servers != num_servers:
        raise MoecompressError(f"the placement in {out} has {num_servers} servers, not {servers}")
    if tokens is not None:
        raise MoecompressError("token policies with several homes are not supported; deploy with one home")
    if len(set(homes)) != len(homes) or not all(0 <= h < num_servers for h in homes):
        raise MoecompressError(f"homes {list(homes)}: give distinct servers of the placement (0..{num_servers - 1})")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not simulate:
        raise MoecompressError("several homes under torchrun are not supported; use deploy(..., simulate=False) on "
                               "one machine")
    infos = {h: read_bundle(out, h, world_size=num_servers, verify=verify) for h in homes}
    for h, info in infos.items():
        if info.mode != Mode.EXPERT or info.holds != "full":
            raise MoecompressError(f"server {h} cannot be a home: several homes need the expert model with dense "
                                   f"weights on every home (its bundle holds {info.holds}, mode {info.mode.value}); "
                                   "shard without --dense-on-one")
    front = homes[0]
    counters = Counters(num_servers, len(infos[front].experts_paths))
    num_experts = len(infos[front].assignment[0]) if infos[front].assignment else 0
    tables = ExpertTables.from_assignment(infos[front].assignment, num_servers)
    if simulate:
        from moecompress.runtime.edge.dispatcher import install_dispatchers
        from moecompress.runtime.edge.rank_model import load_full
        from moecompress.runtime.edge.serve import build_handler

        models, recorders = {}, {}
        for h in homes:
            models[h] = load_full(infos[h], dtype)
            if expert_budget is not None:  # the home's own experts under a store (as _home_model does)
                from moecompress.runtime.store.rank import attach_server_store, held_experts_modules

                attach_server_store(infos[h].directory, held_experts_modules(models[h], infos[h].experts_paths),
                                    infos[h].experts_paths, expert_budget, models[h])
            recorders[h] = [] if record else None
        handlers = {n: build_handler(read_bundle(out, n, world_size=num_servers, verify=verify), dtype,
                                     expert_budget) for n in range(num_servers) if n not in homes}
        members = {}
        for h in homes:
            transport = InProcess(h, {}, num_servers)
            install_dispatchers(models[h], infos[h].experts_paths, tables, h, transport, counters, recorders[h])
            members[h] = (models[h], transport)
        handlers.update({h: home_server(h, models[h], num_experts) for h in homes})
        deployments = {}
        for h, (model, transport) in members.items():
            transport.handlers = {n: handler for n, handler in handlers.items() if n != h}
            deployments[h] = Deployment(model, infos[h], transport, counters, _tokenizer(infos[h].directory), None,
                                        recorders[h])
        return HomesDeployment(homes, deployments, deployments[front], counters,
                               [d for h, d in deployments.items() if h != front])
    import torch.distributed as dist

    from moecompress.runtime.edge.launch import LocalServers
    from moecompress.runtime.edge.transport import init_group

    launched = LocalServers(out, num_servers, front, timeout, str(dtype).removeprefix("torch."), homes=homes,
                            expert_budget=expert_budget)
    launched.wait_ready(load_timeout=max(timeout, 600.0))
    try:
        device = init_group(launched.init_method, front, num_servers, timeout)
    except RuntimeError as exc:
        launched.close(grace=1.0)
        raise MoecompressError(f"the servers did not all join within {timeout:g} s ({exc})") from exc
    transport = TorchDistributed(front, num_servers, timeout, device, launched.watch)
    try:
        model, tokenizer = _home_model(infos[front], dtype, transport, counters, None, None, expert_budget)
    except BaseException:
        transport.close()
        launched.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    deployment = Deployment(model, infos[front], transport, counters, tokenizer, launched, None)
    server = home_server(front, model, num_experts)
    members = {h: deployment if h == front else RemoteHome(h, transport, server, counters) for h in homes}
    return HomesDeployment(homes, members, deployment, counters)
