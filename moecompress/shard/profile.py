"""Measure a checkpoint's compute profile: seconds per decoder layer and per MoE experts block of one decode call.

The model is the runtime's own (`moecompress.from_pretrained`: the packed experts modules every rank of a deployment
runs, the same modules the edge runtime's simulation and real ranks call), timed with forward hooks; the fastest of
`reps` calls. Run it on a target server (`moecompress profile --model CKPT --out FILE`) and pass the file to
`moecompress shard --compute-profile FILE`: placement plans for the servers, not for the machine that plans.
Timer: this thread's CPU time when torch uses one thread (other work on a shared machine is not counted), else
wall time.
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
                    dtype: torch.dtype = torch.bfloat16, model=None) -> ComputeProfile:
    """ComputeProfile of a decode step of `batch` sequences after `context` cached tokens (random token ids)."""
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
    how = "thread CPU time" if timer is time.thread_time else "wall time"
    return ComputeProfile(batch=batch, context=context, layer_seconds=tuple(layer_s), moe_seconds=tuple(moe_s),
                          moe_decoder_layers=tuple(moe), head_seconds=max(total - sum(layer_s), 0.0),
                          source=f"{platform.node()} {platform.processor() or platform.machine()}, torch "
                                 f"{torch.__version__}, {torch.get_num_threads()} thread(s), {how}, {dtype}, "
                                 f"min of {reps}")


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
