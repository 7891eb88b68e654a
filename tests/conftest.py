"""Shared fixtures. `tiny_model(model_type, seed=0, dtype=torch.float32, **config_overrides)` builds (once per
session, then hands out deep copies, so tests may mutate them) a seeded eval-mode random model of a supported MoE
architecture; see moecompress/arch/tiny.py for the shapes."""
from __future__ import annotations

import copy

import pytest
import torch

from moecompress.arch import supported_types
from moecompress.arch import tiny as _tiny

SUPPORTED_TYPES: list[str] = supported_types()

_CACHE: dict = {}


def _build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    key = (model_type, seed, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in _CACHE:
        _CACHE[key] = _tiny.tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    return copy.deepcopy(_CACHE[key])


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model("mixtral")` -> a fresh (deep-copied) seeded random model, eval mode."""
    return _build


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops: intra-op threads only add spin-wait on a busy small box. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def calibrated_qwen3():
    """A tiny qwen3_moe (every expert in_features 64) calibrated on 8 x 32 random tokens: (model, layout, the
    batches as (ids, mask), calibration statistics). Module-scoped: tests must not mutate the model."""
    from moecompress.arch import describe
    from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate

    model = _tiny.tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(ids, torch.ones_like(ids))
    stats = calibrate(model, None, data, CalibrationOptions(samples=8, seq_len=32, batch_size=8, progress=False))
    return model, describe(model), [(i, m) for i, m, _ in data.batches(8)], stats


@pytest.fixture
def rank_threads(monkeypatch):
    """For exact real-run == simulation comparisons: the rank processes (the launcher gives them OMP_NUM_THREADS,
    default 1) and this process's simulation on one intra-op thread, since float sums can differ between thread
    counts."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
