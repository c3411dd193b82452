"""glibc allocator settings: they take effect where glibc is the allocator."""

import ctypes
import sys

import pytest

from msda.runtime import release_memory, tune_allocator

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="needs glibc",
)


@glibc
def test_allocator_settings_apply():
    assert tune_allocator()
    assert tune_allocator()  # idempotent


@glibc
def test_release_memory_gives_back_freed_blocks():
    def rss_mb() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    import numpy as np

    assert tune_allocator()  # freed blocks stay in the heap...
    blocks = [np.ones(1 << 20) for _ in range(64)]  # 64 blocks of 8 MiB
    held = rss_mb()
    del blocks
    assert rss_mb() > held - 64
    assert release_memory()  # ...until handed back
    assert rss_mb() < held - 256  # at least half of the 512 MiB went back
