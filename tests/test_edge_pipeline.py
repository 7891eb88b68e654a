"""The edge runtime, pipeline model: stages of contiguous decoder layers, each with its own KV cache, equal the
single-process model (float32) in simulation and in real gloo processes; simulation and real run count the same."""
from __future__ import annotations

import pytest
import torch
from edge_bundles import IDS, MASK, NEW_TOKENS, checkpoint, pipeline_bundles, processes_equal_simulation, run_calls

from moecompress.execution.counters import HEADER_BYTES
from moecompress.runtime.edge import deploy


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ck, logits, tokens = checkpoint(tmp_path_factory)
    pipeline_bundles(ck, ck.parent / "pipe2", (0, 0, 1), 2)
    pipeline_bundles(ck, ck.parent / "pipe3", (0, 1, 2), 3)
    pipeline_bundles(ck, ck.parent / "pipe4", (0, 1, 3), 4)  # server 2 holds no layer
    return ck.parent, logits, tokens


@pytest.mark.parametrize("name", ["pipe2", "pipe3", "pipe4"])
def test_simulated_stages_equal_single_process_model(built, name):
    tmp, ref_logits, ref_tokens = built
    with deploy(tmp / name, simulate=True) as d:
        logits, tokens, counts = run_calls(d)
        calls = list(d.calls)
    assert [s for _, s, _ in calls] == [10, 10] + [1] * (NEW_TOKENS - 1)  # forward, prefill, decode steps
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)  # the stages' own KV caches decode like the full model's
    stages = {"pipe2": [0, 1], "pipe3": [0, 1, 2], "pipe4": [0, 1, 3]}[name]
    H = 64
    hops = len(stages)  # home -> ... -> last -> home
    assert counts["hops"] and sum(counts["hops"]) == hops * len(calls)
    expected = sum((len(stages) - 1) * (HEADER_BYTES + b * s * H * 4 + b * kv + b * s * 4) + b * s * H * 4
                   for b, s, kv in calls)
    assert sum(sum(sum(row) for row in layer) for layer in counts["bytes"]) == expected
    from moecompress.artifacts.placement import Placement
    from moecompress.execution.replay import Call, replay

    trace = torch.zeros(sum(b * s for b, s, _ in calls), 3, 2, dtype=torch.long)  # [T, L, k]: the pipeline ignores ids
    placement = Placement.load(tmp / name / "placement.json")
    assert replay(placement, trace, [Call(*c) for c in calls], H, 4).counts() == counts


def test_two_stage_processes_equal_model_and_simulation_counts(built):
    tmp, ref_logits, ref_tokens = built
    processes_equal_simulation(tmp / "pipe2", ref_logits, ref_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pipe3", "pipe4"])
def test_three_and_four_processes_equal_model_and_simulation_counts(built, name):
    tmp, ref_logits, ref_tokens = built
    processes_equal_simulation(tmp / name, ref_logits, ref_tokens)


@pytest.mark.slow
def test_a_dead_middle_stage_is_named(built):
    import os
    import signal

    from moecompress.errors import MoecompressError

    tmp, _, _ = built
    with deploy(tmp / "pipe3", simulate=False, timeout=10) as d:
        d(IDS, MASK)
        os.kill(d.servers.procs[1].pid, signal.SIGKILL)
        d.servers.procs[1].wait(10)
        with pytest.raises(MoecompressError, match="server 1 exited"):
            d(IDS, MASK)
        assert all(p.poll() is not None for p in d.servers.procs.values())  # the others were stopped too
