"""Streamed weights moved onto huge pages (runtime/kernels/huge_pages.py): same bytes and tokens, file pages dropped."""
from __future__ import annotations

import pytest
import torch
from test_cpu_step import checkpoint, load, prompts

from moecompress.runtime.cpu_step import CpuDecoder
from moecompress.runtime.cpu_step.decoder import on_huge_pages
from moecompress.runtime.kernels import cpu_lowbit, huge_pages, kernel_registry

pytestmark = [pytest.mark.skipif(not cpu_lowbit.available(), reason="the low-bit C++ kernels are not built"),
              pytest.mark.skipif(not huge_pages.enabled(), reason="no transparent huge pages here (or turned off)"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def small_models_move(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_TOTAL_BYTES", 0)  # the tiny checkpoints are far below the real threshold
    monkeypatch.setenv(kernel_registry.INT8_ACTIVATIONS_ENV, "always")


def _rss_of(start: int, end: int) -> int:
    """Resident KB of this process's pages in [start, end)."""
    total, cur = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                a, b = (int(x, 16) for x in head[0].split("-"))
                cur = a < end and b > start
            elif cur and line.startswith("Rss:"):
                total += int(head[1])
    return total


def test_moved_weights_keep_their_bytes_and_tokens(tmp_path_factory):
    ck = checkpoint("qwen3_moe", tmp_path_factory)
    ids, mask = prompts(2, seed=3)
    model, ref = load(ck), load(ck)
    ref.__dict__[huge_pages.ATTR] = None, 0  # the reference stays in the file mapping
    plan_tensors = CpuDecoder(ref, 32, 2).plan.streamed()
    before = {id(t): t.clone() for t in plan_tensors}
    decoder = CpuDecoder(model, 32, 2)
    moved = huge_pages.moved_bytes(model)
    assert moved > 0 and on_huge_pages(model, decoder.plan) == 0  # once per model
    arena, _ = model.__dict__[huge_pages.ATTR]
    files = huge_pages._file_ranges()
    streamed = decoder.plan.streamed()
    assert sum(t.nbytes for t in streamed if not huge_pages._in_file(t.data_ptr(), files)) >= moved * 0.9
    for got, want in zip(streamed, plan_tensors):
        assert torch.equal(got, want) and torch.equal(want, before[id(want)])
    # the model's own modules read the moved memory: its forward equals the unmoved model's exactly
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    assert torch.equal(decoder.generate(ids, 8, attention_mask=mask),
                       CpuDecoder(ref, 32, 2).generate(ids, 8, attention_mask=mask))
    del arena


def _mapped(path, n: int, seed: int) -> torch.Tensor:
    """n random bytes written to `path`, mapped privately (as safetensors maps a checkpoint)."""
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.write_bytes(data.numpy().tobytes())
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.uint8)


def test_file_pages_are_dropped_and_small_or_anonymous_tensors_stay(tmp_path):
    big = _mapped(tmp_path / "big.bin", 4 << 20, 0).view(torch.float16)
    small = _mapped(tmp_path / "small.bin", 1000, 1)
    anon = torch.arange(1 << 20, dtype=torch.float32)
    want, ptr = big.view(torch.uint8).clone(), big.data_ptr()
    big.view(torch.uint8).sum(), small.sum()  # resident
    assert _rss_of(ptr, ptr + big.nbytes) >= 4000

    class Owner:
        pass

    owner = Owner()
    moved = huge_pages.move(owner, [big, small, anon, big])
    assert moved == big.nbytes  # small (< a page) and anonymous tensors stay; the repeated one moves once
    assert torch.equal(big.view(torch.uint8), want) and big.data_ptr() != ptr
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert not huge_pages._in_file(big.data_ptr(), huge_pages._file_ranges())
    assert huge_pages._in_file(small.data_ptr(), huge_pages._file_ranges())
    assert _rss_of(ptr, ptr + want.nbytes) == 0  # its file pages left this process
    assert huge_pages.move(owner, [small]) == moved  # once per owner


def test_off_switch(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    assert not huge_pages.enabled()

    class Owner:
        pass

    assert huge_pages.move(Owner(), [torch.zeros(1 << 20)]) == 0
