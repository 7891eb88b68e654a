"""Measure a checkpoint's compute profile: seconds per decoder layer and per MoE experts block of one decode call.

The model is the runtime's own (`moecompress.from_pretrained`: the packed experts modules every rank of a deployment
runs, the same modules the edge runtime's simulation and real ranks call), timed with forward hooks; the fastest of
`reps` calls. Run it on a target server (`moecompress profile --model CKPT --out FILE`) and pass the file to
`moecompress shard --compute-profile FILE`: placement plans for the servers, not for the machine that plans.
Timer: this thread's CPU time when torch uses one thread (other work on a shared machine is not counted), else
wall time. The expert model's dispatch (the home's routing, each request's encoding and decoding on both ends) is
measured per MoE layer by running the runtime's own dispatcher on the decode call's recorded inputs
(`measure_dispatch`); execution/timing.profile_compute puts it on the critical path.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.timing import ComputeProfile
from moecompress.shard.bundles import moe_decoder_layers, read_spec_and_config


def measure_profile(checkpoint: str | Path, batch: int = 1, context: int = 128, reps: int = 5,
                    dtype: torch.dtype = torch.bfloat16, model=None, transport: bool = True) -> ComputeProfile:
    """ComputeProfile of a decode step of `batch` sequences after `context` cached tokens (random token ids), in
    `dtype` (the deployment's: `moecompress run/generate --dtype`, float32 by default; `model`, when given, must
    have been loaded in it). `transport`: also time a request's round trip through torch.distributed between two
    local processes (shard/profile_transport.py; False: charged as 0)."""
    import moecompress

    if batch < 1 or context < 1 or reps < 1:
        raise MoecompressError("profile: batch, context and reps must be >= 1")
    config, spec = read_spec_and_config(Path(checkpoint))
    moe = moe_decoder_layers(spec)
    model = model if model is not None else moecompress.from_pretrained(str(checkpoint), dtype=dtype).eval()
    container = next(iter(spec.experts)).rsplit(".", 1)[0]
    container = container[:container.index(f".{moe[0]}.")]  # 'model.layers'
    layers = list(model.get_submodule(container))
    experts = [model.get_submodule(p) for p in spec.experts]
    timer = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    spent: dict[tuple[str, int], float] = {}
    starts: dict[tuple[str, int], float] = {}
    handles = []
    for kind, mods in (("layer", layers), ("moe", experts)):
        for i, mod in enumerate(mods):
            handles.append(mod.register_forward_pre_hook(lambda *_, k=(kind, i): starts.__setitem__(k, timer())))
            handles.append(mod.register_forward_hook(
                lambda *_, k=(kind, i): spent.__setitem__(k, spent.get(k, 0.0) + timer() - starts[k])))
    inputs: dict[int, tuple] = {}  # MoE layer -> (hidden, top_k_index, top_k_weights) of the last decode call
    for i, mod in enumerate(experts):
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: inputs.__setitem__(i, _experts_args(args, kwargs)), with_kwargs=True))
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    gen = torch.Generator().manual_seed(0)
    best = None
    try:
        with torch.no_grad():
            for _ in range(reps):
                past = model(torch.randint(0, vocab, (batch, context), generator=gen), use_cache=True).past_key_values
                ids = torch.randint(0, vocab, (batch, 1), generator=gen)
                spent.clear()
                start = timer()
                model(ids, past_key_values=past, use_cache=True)
                total = timer() - start
                if best is None or total < best[0]:
                    best = (total, [spent.get(("layer", i), 0.0) for i in range(len(layers))],
                            [spent.get(("moe", i), 0.0) for i in range(len(experts))])
    finally:
        for h in handles:
            h.remove()
    total, layer_s, moe_s = best
    step = generate_overhead(model, vocab, batch, context, reps, timer)  # after the hooks are gone
    # the dispatch's parts are sub-millisecond differences: the fastest of more calls than the model's
    dispatch = [measure_dispatch(mod, *inputs[i], reps=max(4 * reps, 20), timer=timer)
                for i, mod in enumerate(experts)]
    how = "thread CPU time" if timer is time.thread_time else "wall time"
    round_trip = 0.0
    if transport:
        from moecompress.shard.profile_transport import measure_transport

        hidden, ids, _ = inputs[0]
        gap = (total - sum(moe_s)) / max(len(experts), 1)  # the home's own work between two MoE layers
        round_trip = measure_transport(ids.shape[0], hidden.shape[-1], ids.shape[1], dtype, gap=gap)
    return ComputeProfile(batch=batch, context=context, layer_seconds=tuple(layer_s), moe_seconds=tuple(moe_s),
                          moe_decoder_layers=tuple(moe), head_seconds=max(total - sum(layer_s), 0.0),
                          source=f"{platform.node()} {platform.processor() or platform.machine()}, torch "
                                 f"{torch.__version__}, {torch.get_num_threads()} thread(s), {how}, {dtype}, "
                                 f"min of {reps}",
                          dispatch_seconds=tuple(d[0] for d in dispatch), message_seconds=tuple(d[1] for d in dispatch),
                          serve_seconds=tuple(d[2] for d in dispatch), dtype=str(dtype).removeprefix("torch."),
                          transport_seconds=round_trip, generate_seconds=step)


def generate_overhead(model, vocab: int, batch: int, context: int, reps: int, timer, steps: int = 8) -> float:
    """Seconds a step of `model.generate` (greedy) after `context` tokens adds to the model's forward: (a generation
    of 1 + `steps` new tokens - one of 1) / `steps` - one decode forward, each the fastest of `reps`; >= 0."""
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = timer()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        return timer() - start

    def forward() -> float:
        past = model(ids, use_cache=True).past_key_values
        start = timer()
        model(ids[:, :1], past_key_values=past, use_cache=True)
        return timer() - start

    with torch.no_grad():
        run(2)  # warm-up
        one = min(run(1) for _ in range(reps))
        many = min(run(1 + steps) for _ in range(reps))
        bare = min(forward() for _ in range(reps))
    return max((many - one) / steps - bare, 0.0)


def _experts_args(args, kwargs) -> tuple:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return tuple(v.detach().clone() for v in values)


class _TimedServer:
    """An expert server (runtime/edge/rank_model.ExpertServer) whose request handling is timed."""

    def __init__(self, inner, timer):
        self.inner, self.timer, self.seconds = inner, timer, 0.0

    def handle(self, head, payload):
        start = self.timer()
        out = self.inner.handle(head, payload)
        self.seconds += self.timer() - start
        return out


def measure_dispatch(module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, reps: int = 5,
                     timer=time.thread_time) -> tuple[float, float, float]:
    """(dispatch, message, serve) seconds of one MoE layer's call through the runtime's own dispatcher
    (DispatchedExperts, InProcess transport, ExpertServer: the code a deployment runs), on the call's recorded
    inputs: two virtual servers, home 0. dispatch: every expert on the home (no request) minus its experts' compute;
    message: every expert on server 1 (one request of all rows) minus the server's handling minus dispatch; serve:
    the server's handling minus its experts' compute. Fastest of `reps` (after one warm-up); never below 0."""
    from moecompress.execution.counters import Counters
    from moecompress.execution.routing import ExpertTables
    from moecompress.runtime.edge.dispatcher import DispatchedExperts
    from moecompress.runtime.edge.rank_model import ExpertServer
    from moecompress.runtime.edge.transport import InProcess

    E = int(getattr(module, "num_experts", 0) or int(ids.max()) + 1)
    spent = [0.0]
    mark = [0.0]
    hooks = [module.register_forward_pre_hook(lambda *_: mark.__setitem__(0, timer())),
             module.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + timer() - mark[0]))]

    def tables(server: int) -> ExpertTables:
        holds = torch.zeros(1, E, 2, dtype=torch.bool)
        holds[0, :, server] = True
        return ExpertTables(holds=holds, primary=torch.full((1, E), server, dtype=torch.long))

    server = _TimedServer(ExpertServer(1, 0, {0: module}), timer)
    local = DispatchedExperts(0, module, tables(0), 0, InProcess(0, {}, 2), Counters(2, 1))
    remote = DispatchedExperts(0, None, tables(1), 0, InProcess(0, {1: server}, 2), Counters(2, 1))
    best = [float("inf")] * 3  # local total - experts, remote total - handling, handling - experts
    try:
        with torch.no_grad():
            for rep in range(reps + 1):
                spent[0] = 0.0
                start = timer()
                local(hidden, ids, weights)
                own = (timer() - start) - spent[0]
                spent[0], server.seconds = 0.0, 0.0
                start = timer()
                remote(hidden, ids, weights)
                total = timer() - start
                if rep:
                    best = [min(best[0], own), min(best[1], total - server.seconds),
                            min(best[2], server.seconds - spent[0])]
    finally:
        for h in hooks:
            h.remove()
    dispatch = max(best[0], 0.0)
    return dispatch, max(best[1] - dispatch, 0.0), max(best[2], 0.0)


def save_profiles(profiles: list[ComputeProfile], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"profiles": [p.to_json() for p in profiles]}, indent=1))


def load_profile(path: str | Path, batch: int) -> ComputeProfile:
    """The profile of `batch` sequences from a `moecompress profile` file; MoecompressError naming those present."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MoecompressError(f"cannot read compute profile {path}: {exc}") from exc
    profiles = [ComputeProfile.from_json(d) for d in doc.get("profiles", [])]
    for p in profiles:
        if p.batch == batch:
            return p
    raise MoecompressError(f"compute profile {path} has batch sizes {[p.batch for p in profiles]}, not {batch}; "
                           f"measure it with `moecompress profile --batch {batch}`")
