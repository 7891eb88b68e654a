"""Start a deployment: `deploy(OUT, ...)` returns the running Deployment (running.py) of its home server.

`deploy(OUT, simulate=True)` runs every server in this process (N virtual servers, each built from its own bundle
only, exchanging the same bytes); `simulate=False` starts the other servers as local processes over
torch.distributed, or, under torchrun (RANK / WORLD_SIZE set), joins the group started there as the home rank.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.execution.routing import Mode
from moecompress.runtime.edge.bundle import BundleInfo, placement_doc, read_bundle
from moecompress.runtime.edge.handlers import build_handler
from moecompress.runtime.edge.running import Deployment, home_model
from moecompress.runtime.edge.transport import InProcess, TorchDistributed

__all__ = ["Deployment", "deploy"]


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
    them; sequences spread round robin, the first home is this process, the homes compute at the same time; see
    homes.py and home_rank.py; gloo only; token policies run at every home): a HomesDeployment.
    expert_budget: bytes of experts each server keeps in memory, the rest read from its bundle on use (expert
    model; runtime/store/); None: all resident.
    """
    from moecompress.runtime.edge.tokens import resolve_pipeline

    if homes is not None and len(set(homes)) > 1:
        return _deploy_homes(Path(out), tuple(int(h) for h in homes), simulate, servers, dtype, timeout, record,
                             verify, tokens, similarity, expert_budget)

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
        model, tokenizer = home_model(info, dtype, transport, counters, recorder, settings, expert_budget)
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


def _deploy_homes(out: Path, homes: tuple[int, ...], simulate: bool, servers, dtype, timeout: float, record: bool,
                  verify: bool, tokens, similarity=None, expert_budget: int | None = None):
    """deploy(..., homes=...): every home's model (simulation) or the front's and the other homes' processes (the
    other homes compute at the same time as the front: home_rank.py). Under torchrun this must be the front's rank
    (homes[0]); the other ranks run `moecompress run` with the same --homes. expert_budget: every server's own
    experts (homes' too) under a store of that many bytes."""
    from dataclasses import replace

    from moecompress.runtime.edge.homes import HomesDeployment, RemoteHome, home_server
    from moecompress.runtime.edge.tokens import load_similarity, resolve_pipeline, token_settings

    doc, _ = placement_doc(out)
    num_servers = len(doc["memory_bytes"])
    if servers is not None and servers != num_servers:
        raise MoecompressError(f"the placement in {out} has {num_servers} servers, not {servers}")
    if len(set(homes)) != len(homes) or not all(0 <= h < num_servers for h in homes):
        raise MoecompressError(f"homes {list(homes)}: give distinct servers of the placement (0..{num_servers - 1})")
    pipeline = resolve_pipeline(tokens)  # a bad spec is refused before anything starts
    similarity = load_similarity(similarity)
    front = homes[0]
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and not simulate
    if torchrun and int(os.environ["RANK"]) != front:
        raise MoecompressError(f"rank {os.environ['RANK']} is not the front home ({front}); start every rank with "
                               f"`moecompress run --homes {','.join(map(str, homes))}`, which serves on the others")
    world = int(os.environ["WORLD_SIZE"]) if torchrun else num_servers
    infos = {h: replace(read_bundle(out, h, world_size=world, verify=verify), home=h) for h in homes}
    for h, info in infos.items():
        if info.mode != Mode.EXPERT or info.holds != "full":
            raise MoecompressError(f"server {h} cannot be a home: several homes need the expert model with dense "
                                   f"weights on every home (its bundle holds {info.holds}, mode {info.mode.value}); "
                                   "shard without --dense-on-one")
    settings = {h: token_settings(infos[h], pipeline, similarity) if pipeline.policies else None for h in homes}
    num_experts = len(infos[front].assignment[0]) if infos[front].assignment else 0

    def counters():
        c = Counters(num_servers, len(infos[front].experts_paths))
        c.token_policy = pipeline.spec
        return c

    if simulate:
        handlers = {n: build_handler(read_bundle(out, n, world_size=num_servers, verify=verify), dtype,
                                     expert_budget) for n in range(num_servers) if n not in homes}
        deployments = {}
        for h in homes:  # no router prefetch for a home's store: see home_model
            transport, own, recorder = InProcess(h, {}, num_servers), counters(), [] if record else None
            model, tokenizer = home_model(infos[h], dtype, transport, own, recorder, settings[h], expert_budget,
                                          router_prefetch=False)
            handlers[h] = home_server(h, model, num_experts)
            deployments[h] = Deployment(model, infos[h], transport, own, tokenizer, None, recorder, settings[h])
        for h, d in deployments.items():
            d.transport.handlers = {n: handler for n, handler in handlers.items() if n != h}
        return HomesDeployment(homes, deployments, deployments[front],
                               [d for h, d in deployments.items() if h != front])
    import torch.distributed as dist

    from moecompress.runtime.edge.home_rank import ExpertService, check_gloo
    from moecompress.runtime.edge.transport import exchange_device, init_group

    check_gloo(exchange_device(front))
    launched = None
    if torchrun:
        init, watch = "env://", None
    else:
        from moecompress.runtime.edge.launch import LocalServers

        launched = LocalServers(out, num_servers, front, timeout, str(dtype).removeprefix("torch."), homes=homes,
                                expert_budget=expert_budget)
        launched.wait_ready(load_timeout=max(timeout, 600.0))
        init, watch = launched.init_method, launched.watch
    try:
        device = init_group(init, front, num_servers, timeout)
    except RuntimeError as exc:
        if launched is not None:
            launched.close(grace=1.0)
        raise MoecompressError(f"the servers did not all join within {timeout:g} s ({exc})") from exc
    transport = TorchDistributed(front, num_servers, timeout, device, watch)
    try:
        own = counters()
        model, tokenizer = home_model(infos[front], dtype, transport, own, None, settings[front], expert_budget,
                                      router_prefetch=False)
        deployment = Deployment(model, infos[front], transport, own, tokenizer, launched, None, settings[front])
        service = ExpertService(home_server(front, model, num_experts), front, num_servers, device, len(homes) - 1)
    except BaseException:
        transport.close()
        if launched is not None:
            launched.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    members = {h: deployment if h == front else RemoteHome(h, transport, counters()) for h in homes}
    if pipeline.policies:
        for h, m in members.items():
            if h != front:
                m.tokens = (pipeline.spec, similarity)
    return HomesDeployment(homes, members, deployment, service=service)
