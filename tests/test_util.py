"""Small shared helpers."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import pytest

from lookalike import util


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim and /proc are Linux's"
)
def test_trim_memory_hands_freed_heap_pages_back_and_is_false_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed blocks below the heap's top stay resident until trimmed: what a big read leaves behind."""
    blocks = [np.ones(8000) for _ in range(4000)]  # 64 KB each (below glibc's mmap threshold): 256 MB of heap
    last = blocks[-1]  # (the top block kept: the heap cannot simply shrink)
    del blocks
    before = _rss_mb()
    assert util.trim_memory() is True
    assert before - _rss_mb() > 128, "the freed 256 MB stayed resident"
    assert last.sum() == 8000
    monkeypatch.setattr(util, "_LIBC", False)  # (a C library without malloc_trim, or none found)
    assert util.trim_memory() is False
