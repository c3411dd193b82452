"""Process settings that make CPU training and prediction fast, and memory flat.

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
import sys

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
