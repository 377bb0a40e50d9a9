"""Tests of ``pdm_jax.benchmark.memory``: the peak-RSS helpers of the memory figures (Linux)."""

import sys

import numpy as np
import pytest

from pdm_jax.benchmark import memory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_release_free_heap_returns_freed_small_blocks():
    # 200 MB in 4 KiB blocks (below malloc's mmap threshold: they live in the heap arena),
    # freed in an order that leaves most of the arena's pages free but not at its top.
    keep, blocks = [], [bytearray(4096) for _ in range(50_000)]
    for i, b in enumerate(blocks):
        b[::512] = b"\x01" * 8  # touch every page
        if i % 100 == 0:
            keep.append(b)
    before_free = _rss()
    del blocks, b
    after_free = _rss()
    assert memory.release_free_heap()
    after_trim = _rss()
    assert after_free > before_free - 50e6  # free() alone keeps the pages resident
    assert after_trim < after_free - 100e6  # malloc_trim gives them back
    assert len(keep) == 500


def test_phase_peak_counts_the_phase_alone():
    big = np.ones(300_000_000 // 8)  # 300 MB before the phase
    del big
    with memory.phase_peak() as rss:
        start = _rss()
        small = np.ones(50_000_000 // 8)  # 50 MB inside it
        small += 1
        del small
    assert rss.source == "process_vmhwm"
    assert rss.process_bytes >= rss.phase_bytes + 200e6  # the 300 MB count only there
    assert start + 45e6 <= rss.phase_bytes < start + 100e6
