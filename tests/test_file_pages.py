"""Loading keeps each weight once in RSS: file pages that only converted tensors read are dropped (file_pages.py)."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
from helpers import quantize_tiny

import moecompress
from moecompress.export.checkpoint import export_checkpoint
from moecompress.runtime.loading import convert
from moecompress.runtime.loading.file_pages import file_mappings, unused_ranges

IDS = torch.tensor([[5, 17, 99, 3, 64, 23, 11, 7], [9, 4, 61, 33, 120, 2, 18, 47]])
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def test_unused_ranges_are_whole_pages_outside_live_tensors():
    page = 4096
    live = [(page + 10, 2 * page + 5), (2 * page + 100, 3 * page), (9 * page, 20 * page)]
    assert unused_ranges((0, 10 * page), live, page) == [(0, page), (3 * page, 9 * page)]
    assert unused_ranges((0, 4 * page), [], page) == [(0, 4 * page)]
    assert unused_ranges((100, page + 50), [], page) == []  # no whole page inside


def _mapped_rss_kib(directory) -> int:
    """Resident KiB of this process's mappings of files under `directory`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) > 5 and head[5].startswith(str(directory))
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@linux
def test_converted_tensors_leave_no_resident_file_pages(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe", vocab_size=4096)  # a 1 MiB bf16 embedding: many pages
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "a")  # bf16 dense weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # float32: every dense bf16 weight is converted (copied); the packed tensors stay views of the mapping
    released = moecompress.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert file_mappings(), "the packed tensors view the checkpoint's file mapping"
    monkeypatch.setattr(convert, "release_unused", lambda model: 0)
    kept = moecompress.from_pretrained(tmp_path / "b", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(released(IDS).logits, kept(IDS).logits)  # dropped pages were read by no tensor
    assert _mapped_rss_kib(tmp_path / "a") + 1024 <= _mapped_rss_kib(tmp_path / "b")


def test_long_cpu_forwards_give_the_freed_heap_back(tiny_model, tmp_path, monkeypatch):
    """A loaded checkpoint trims the heap after every forward of >= TRIM_MIN_TOKENS tokens, never after decode-sized
    ones, and computes the same logits with or without the hook."""
    from moecompress.runtime.kernels import heap

    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "a")
    loaded = moecompress.from_pretrained(tmp_path / "a", dtype=torch.float32)
    trims = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1) or True)
    long_ids = torch.randint(0, 100, (2, heap.TRIM_MIN_TOKENS // 2))
    with torch.no_grad():
        hooked = loaded(long_ids).logits
        assert len(trims) == (1 if heap._libc() is not None else 0)
        loaded(IDS[:, :4])
        loaded(input_ids=IDS)  # 16 tokens: a decode-sized call
        assert len(trims) == (1 if heap._libc() is not None else 0)
        if heap._libc() is not None:
            getattr(loaded, heap._ATTR).remove()
            delattr(loaded, heap._ATTR)
        assert torch.equal(loaded(long_ids).logits, hooked)
    assert heap.install(loaded) == (heap._libc() is not None)
    assert not heap.install(loaded)  # once per model
