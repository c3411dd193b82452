"""Process settings that make CPU training and prediction fast, and memory flat, on a machine
shared with other work.

Threads: PyTorch starts one OpenMP thread per core of the machine, and its threads spin while
they wait. On a machine other processes keep busy, a thread that loses its core stalls every
parallel region of the others, and spinning threads take the cores from the threads doing work:
prediction ran 7 x and a training step 3 x slower. ``configure_threads`` takes the cores this
process may use (affinity mask, cgroup CPU quota), and OpenMP waits passively
(``OMP_WAIT_POLICY``, set when ``msda`` is imported, before PyTorch loads OpenMP).

PyTorch allocates each large activation with ``malloc``; glibc serves blocks above its mmap
threshold (128 KiB by default, adapting up to 32 MiB) with fresh ``mmap`` pages and gives
them back on ``free``, so every step page-faults and zero-fills its activations again. That
made element-wise ops on the stacked ensemble's activations 2-4x slower than their memory
bandwidth. ``tune_allocator`` keeps freed memory in the heap for reuse instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once: ``find_library`` runs ``ldconfig`` in a subprocess."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; False off glibc).

    Called after each map block: threads' malloc arenas otherwise keep every block's buffers
    (Dask's advice for threaded workers), so memory would grow with the number of blocks.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent; False off glibc)."""
    global _done
    if _done:
        return True
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024))  # glibc's maximum
    ok &= bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
    ok &= bool(mallopt(_M_TOP_PAD, 256 * 1024 * 1024))
    _done = ok
    return ok


def bar_interval() -> float:
    """Seconds between progress-bar updates: 0.1 on a terminal, 30 in a log (stderr not a tty),
    so that a long run writes a line every half minute instead of ten a second."""
    try:
        return 0.1 if sys.stderr.isatty() else 30.0
    except (AttributeError, ValueError):  # stderr closed or replaced
        return 30.0


def scheduler_timeout() -> float:
    """Seconds to connect to a Dask scheduler and finish its handshake (Dask's
    ``distributed.comm.timeouts.connect``, 30 s by default)."""
    import dask
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


def check_scheduler_address(address: str) -> None:
    """One MsdaError for an address that cannot name a Dask scheduler (scheme, host:port)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    from msda.errors import MsdaError

    try:
        scheme, loc = parse_address(address, strict=True)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            _, port = parse_host_port(loc)
            if not 0 < int(port) < 65536:
                raise ValueError(f"port {port} out of range")
    except (ValueError, TypeError) as exc:
        raise MsdaError(f"--scheduler {address!r}: not a Dask scheduler address such as tcp://host:8786 ({exc})") from None


def connect_scheduler(address: str, timeout: float | None = None):
    """A Dask ``Client`` of the scheduler at ``address``, or one MsdaError within ``timeout``.

    Dask's own connect waits for the scheduler's handshake without a limit, so an address that
    accepts connections but is not a Dask scheduler would hang: the handshake is tried first,
    bounded.
    """
    import asyncio

    from distributed import Client
    from distributed.comm import connect

    from msda.errors import MsdaError

    check_scheduler_address(address)
    timeout = scheduler_timeout() if timeout is None else timeout

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    try:
        asyncio.run(handshake())
        return Client(address, timeout=timeout)
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        reason = str(exc) or f"no Dask handshake within {timeout:g} s"
        raise MsdaError(f"cannot reach a Dask scheduler at {address} ({reason})") from None


def quiet_local_workers(client) -> None:
    """Local Dask workers leave Ctrl-C to the client, which stops them: without this, each
    worker process of the terminal's process group prints its own KeyboardInterrupt."""
    from distributed import WorkerPlugin

    class IgnoreInterrupt(WorkerPlugin):
        name = "msda-ignore-interrupt"

        def setup(self, worker) -> None:
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    client.register_plugin(IgnoreInterrupt())


def resolve_device(device):
    """``auto``/None -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N`` (and ``mps``
    where present) checked against this machine: one MsdaError naming the value otherwise."""
    import torch

    from msda.errors import MsdaError

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MsdaError(f"--device {str(device)!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MsdaError(f"device {str(device)!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MsdaError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MsdaError(f"device {str(device)!r} asked for, but MPS is not available here")
    elif dev.type != "cpu":
        raise MsdaError(f"--device {str(device)!r}: msda runs on cpu, cuda or cuda:N")
    return dev


# ----- threads -------------------------------------------------------------------------------
THREADS_ENV = "MSDA_THREADS"  # a fixed thread count for every command, as --threads


CGROUP_FILES = [(Path("/sys/fs/cgroup/cpu.max"), None),  # v2: "quota period" or "max period"
                (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
                (Path("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"))]


def _cgroup_quota() -> float | None:
    """CPUs the cgroup quota allows this process (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None
    without a quota."""
    for quota_file, period_file in CGROUP_FILES:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            q, p = float(quota), float(period)
        except ValueError:
            continue
        return q / p if q > 0 and p > 0 else None
    return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a quota of
    1.5 CPUs gives 1: a second thread would be throttled half the time)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def default_threads() -> int:
    """Threads for heavy work when none is asked for: the available cores. Not fewer when other
    processes are busy: with passive waiting, as many threads as cores ran 1.1-1.8 x faster than
    one thread beside two busy processes, where one thread per free core lost up to 28 %
    (benchmarks/RESULTS.md, benchmarks/contention.py)."""
    return available_cores()


def configure_threads(threads: int | None = None) -> int:
    """Set PyTorch's threads for this process and return the count: ``threads`` if given (> 0),
    else ``MSDA_THREADS`` or ``OMP_NUM_THREADS`` if set, else ``default_threads()``; never more
    than the available cores unless asked for explicitly."""
    import torch

    from msda.errors import MsdaError

    if threads is not None and threads < 0:
        raise MsdaError(f"--threads must be >= 1 (0 or none: automatic), got {threads}")
    if not threads:
        for name in (THREADS_ENV, "OMP_NUM_THREADS"):
            value = os.environ.get(name, "").strip()
            if value:
                try:
                    threads = int(value)
                except ValueError:
                    raise MsdaError(f"{name}={value!r}: a whole number of threads") from None
                if threads < 1:
                    raise MsdaError(f"{name}={value!r}: at least 1 thread")
                break
    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
