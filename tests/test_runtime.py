"""Process settings: glibc allocator settings (where glibc is the allocator), threads and OpenMP waiting."""

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


def test_threads_follow_affinity_quota_and_settings(tmp_path, monkeypatch):
    import os

    import torch

    from msda import runtime
    from msda.errors import MsdaError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(runtime, "CGROUP_FILES", [(tmp_path / "cpu.max", None)])
    assert runtime.available_cores() == 6  # no quota file
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.available_cores() == 6
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: 2 threads, not a throttled third
    assert runtime.available_cores() == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert runtime.available_cores() == 1
    before = torch.get_num_threads()
    try:
        for name in ("MSDA_THREADS", "OMP_NUM_THREADS"):
            monkeypatch.delenv(name, raising=False)
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        assert runtime.configure_threads(3) == 3 and torch.get_num_threads() == 3  # asked for: as asked
        monkeypatch.setenv("MSDA_THREADS", "2")
        assert runtime.configure_threads() == 2
        monkeypatch.setenv("MSDA_THREADS", "two")
        with pytest.raises(MsdaError, match="MSDA_THREADS='two'"):
            runtime.configure_threads()
    finally:
        torch.set_num_threads(before)


def test_openmp_waits_passively_unless_told_otherwise():
    import subprocess
    import sys

    code = "import os, msda; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "1000"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "None"
