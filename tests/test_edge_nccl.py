"""The edge runtime over NCCL: with MOECOMPRESS_EDGE_DEVICE=cuda each rank exchanges on its own GPU (NCCL), and the
outputs and counters equal the single-process model's and the simulation's (needs 2 CUDA GPUs; skipped otherwise).
On CPU: the device and link-emulation settings are read and refused as documented."""
from __future__ import annotations

import pytest
import torch
from edge_bundles import checkpoint, expert_bundles, pipeline_bundles, processes_equal_simulation

from moecompress.errors import MoecompressError
from moecompress.runtime.edge.transport import BACKENDS, DELAY_ENV, DEVICE_ENV, LinkDelay, exchange_device

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs (one per rank) for NCCL")
@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_nccl_two_ranks_equal_single_process(tmp_path_factory, tmp_path, monkeypatch, mode):
    ck, ref_logits, ref_tokens = checkpoint(tmp_path_factory)
    out = expert_bundles(ck, tmp_path / "b", 2) if mode == "expert" else pipeline_bundles(ck, tmp_path / "b",
                                                                                         (0, 1, 1), 2)
    monkeypatch.setenv(DEVICE_ENV, "cuda")  # the launched server inherits it
    assert exchange_device(0) == torch.device("cuda", 0) and exchange_device(1) == torch.device("cuda", 1)
    torch.cuda.set_device(0)
    counters = processes_equal_simulation(out, ref_logits, ref_tokens)
    assert counters.bytes.sum() > 0 and counters.hops.sum() > 0
    import torch.distributed as dist

    assert not dist.is_initialized()  # closed and cleaned up


def test_device_setting(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert exchange_device(3) == torch.device("cpu") and BACKENDS == {"cpu": "gloo", "cuda": "nccl"}
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(MoecompressError, match="allowed: cpu, cuda"):
        exchange_device(0)
    if torch.cuda.device_count() < 8:
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(MoecompressError, match="one GPU per rank"):
            exchange_device(7)


def test_link_delay_setting(monkeypatch):
    monkeypatch.delenv(DELAY_ENV, raising=False)
    assert LinkDelay.from_env() is None
    monkeypatch.setenv(DELAY_ENV, "5ms,100Mbit/s")
    d = LinkDelay.from_env()
    assert d.latency == pytest.approx(5e-3) and d.rate == pytest.approx(12.5e6)
    monkeypatch.setenv(DELAY_ENV, "250us")
    d = LinkDelay.from_env()
    assert d.latency == pytest.approx(250e-6) and d.rate is None
    monkeypatch.setenv(DELAY_ENV, "5 parsecs")
    with pytest.raises(MoecompressError, match="LATENCY\\[,RATE\\]"):
        LinkDelay.from_env()
