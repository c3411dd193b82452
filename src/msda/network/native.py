"""The C kernels (``_convstage.c``), built on first use: the convolution stage of CPU inference,
and the convolutions and batch norms of CPU training (the three convolutions, the dense layers'
batch norms).

Inference: the three convolutions of a member, with their ReLUs and poolings, run per sample
with every intermediate in L1 cache; PyTorch instead writes each stage of a whole batch to
memory and reads it back (figures: benchmarks/RESULTS.md). Training (``stacked.py``): conv1 -> ReLU -> dropout ->
pool -> conv2 per sample and member, conv1's output never written to memory, and the backward
pass through both (``conv12_*``); conv2's batch norm, ReLU, dropout and pool applied where conv3
reads them and conv3 (``conv3_*``, the pooled output never stored), conv3's batch norm, ReLU,
dropout and pool of 4 (``bnpoolw_*``); and the dense layers' batch norm and ReLU in their
(members, batch, width) layout (``bnrelu_*``).

The source is compiled once per machine with the system's C compiler (``$CC``, else cc, gcc or
clang; ``-O3 -march=native``, with ``-fopenmp`` where the compiler has it) into
``$MSDA_CACHE_DIR`` (default ``~/.cache/msda``), and called through ctypes. With OpenMP, a
kernel splits its samples over PyTorch's own OpenMP threads (the library links the runtime
PyTorch already loaded): Python threads running next to PyTorch's spinning OpenMP workers cost
the training step its gain. Without OpenMP, Python threads split the samples (ctypes releases
the GIL). Without a compiler, or with ``MSDA_NATIVE=0``, the PyTorch operations run instead:
same results to float32 rounding, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import NamedTuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_convstage.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
# the architecture the kernel is written for (model.py constants)
FILTERS, KERNEL, POOLS = (32, 16, 4), 5, (2, 2, 4)
MAX_SERIES, MIN_LENGTH, MAX_LENGTH = 8, 8, 256
_P = ctypes.c_void_p
MAX_WINDOW = 64  # most values in a window of the first convolution (S * K + 1), _convstage.c's MAXKC
_ARGTYPES = [_P, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, _P]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$MSDA_CACHE_DIR``, else ``$XDG_CACHE_HOME/msda``."""
    if os.environ.get("MSDA_CACHE_DIR"):
        return Path(os.environ["MSDA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msda"


def _cpu_signature() -> str:
    """The CPU's model and instruction sets: a library built with -march=native is only reused on
    the same kind of CPU (a home directory shared by cluster nodes of several kinds)."""
    text = platform.processor() + platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("model name", "flags", "Features")))
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, target: Path) -> None:
    """Compile to a temporary name in the cache, then rename (other processes may race us)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # with OpenMP where the compiler has it: the kernels then share PyTorch's threads
        for flags in (FLAGS + ("-fopenmp",), FLAGS):
            res = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                break
        else:
            raise OSError(f"{cc} failed on {SOURCE.name}: {res.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def conv_stage_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, ``MSDA_NATIVE=0``, or the build failed: warned once)."""
    if os.environ.get("MSDA_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("msda: no C compiler found (cc, gcc, clang or $CC); CPU prediction uses the slower PyTorch path",
                      stacklevel=2)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc, FLAGS, _cpu_signature())).encode()).hexdigest()[:20]
    target = cache_dir() / f"convstage-{key}.so"
    try:
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"msda: could not build the C convolution stage ({exc}); CPU prediction uses the PyTorch path",
                      stacklevel=2)
        return None
    train = [_P, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_float, _P]
    pw = [_P, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P]
    bn2 = [_P] * 5 + [_P, ctypes.c_float]  # z, a, c, mean, istd; the mask's words, the scale
    for name, args in (("msda_conv_stage", _ARGTYPES), ("msda_conv12_forward", train + [_P, _P, _P]),
                       ("msda_conv12_backward", train + bn2 + [_P] * 5),
                       ("msda_conv3_forward", [_P, _P, _P, _P, ctypes.c_float, ctypes.c_int, ctypes.c_long, ctypes.c_long,
                                               ctypes.c_int, _P, _P, _P, _P]),
                       ("msda_conv3_backward", bn2 + [ctypes.c_int, _P, ctypes.c_long, ctypes.c_long, ctypes.c_int, _P, _P,
                                                      _P, _P]),
                       ("msda_bnpoolw_forward", pw + [_P, ctypes.c_float, _P]),
                       ("msda_bnpoolw_sums", pw + [_P, _P, _P, ctypes.c_float, _P, _P]),
                       ("msda_bnpoolw_backward", pw + [_P, _P, _P, ctypes.c_float, _P, _P, _P]),
                       ("msda_bnrelu_forward", [_P, ctypes.c_long, ctypes.c_long, ctypes.c_int, _P, _P, ctypes.c_float,
                                                _P, _P, _P]),
                       ("msda_bnrelu_backward", [_P, _P, _P, ctypes.c_long, ctypes.c_long, ctypes.c_int, _P, _P, _P,
                                                 _P, _P, _P, _P])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args + [ctypes.c_int], ctypes.c_int  # the last: threads
    lib.msda_openmp.restype = ctypes.c_int
    return lib


def supports(n_series: int, length: int, filters: tuple, kernel: int, pools: tuple) -> bool:
    """Whether the kernel computes this architecture (else the caller uses PyTorch)."""
    return (
        tuple(filters) == FILTERS and kernel == KERNEL and tuple(pools) == POOLS
        and 1 <= n_series <= MAX_SERIES and MIN_LENGTH <= length <= MAX_LENGTH
    )


@functools.lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Threads for the samples; keyed by process id, since a forked child has none of its parent's."""
    return ThreadPoolExecutor(threads, thread_name_prefix="msda-conv")


class ConvStage:
    """Temporal features of every member from raw rows of normalised inputs, in C.

    Weights as FusedEnsemble folds them: ``w1`` (S*K + 1, M*32) with the bias as its last row,
    ``kernels``/``biases`` of conv2 and conv3 as grouped Conv2d weights (M*O, C, 1, K).
    """

    def __init__(self, lib: ctypes.CDLL, w1: torch.Tensor, kernels: list[torch.Tensor], biases: list[torch.Tensor],
                 n_members: int, n_series: int, length: int, n_features: int):
        m, k = n_members, KERNEL
        c1, c2, c3 = FILTERS
        self.lib, self.fn = lib, lib.msda_conv_stage
        self.m, self.s, self.length, self.n_features = m, n_series, length, n_features
        # (S*K + 1, M*C1) -> (M, S*K + 1, C1)
        self.w1 = w1.reshape(-1, m, c1).permute(1, 0, 2).contiguous()
        # (M*C2, C1, 1, K) -> (M, K, C1, C2): one row of C2 output weights per (tap, channel)
        self.w2 = kernels[0].reshape(m, c2, c1, k).permute(0, 3, 2, 1).contiguous()
        self.b2 = biases[0].contiguous()
        self.w3 = kernels[1].reshape(m, c3, c2, k).contiguous()  # as Conv1d stores it
        self.b3 = biases[1].contiguous()

    def __call__(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """x (n, n_inputs) float32 on CPU, the series from column ``offset``; -> (n, M, 4 * L3)."""
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            x = x.to(torch.float32).contiguous()
        n = x.shape[0]
        out = torch.empty(n, self.m, self.n_features)
        _parallel(self.lib, n, lambda lo, hi, threads, part: self.fn(
            x.data_ptr() + lo * x.stride(0) * 4, x.stride(0), offset, hi - lo, self.s, self.length, self.m,
            self.w1.data_ptr(), self.w2.data_ptr(), self.b2.data_ptr(), self.w3.data_ptr(), self.b3.data_ptr(),
            out.data_ptr() + lo * self.m * self.n_features * 4, threads,
        ), f"n_series={self.s}, length={self.length}")
        return out


def _threads(n: int) -> int:
    """Threads for n samples: torch's thread count, at least 16 samples each."""
    return max(1, min(torch.get_num_threads(), n // 16))


def _parallel(lib: ctypes.CDLL, n: int, call, what: str) -> int:
    """Run ``call(lo, hi, threads, part)`` (a kernel, 0 on success) over n samples; returns the parts.

    Built with OpenMP, one call splits the samples over PyTorch's OpenMP threads; else each part
    runs in a thread of a pool (ctypes releases the GIL), one thread each."""
    threads = _threads(n)
    if threads == 1 or lib.msda_openmp():
        rcs = [call(0, n, threads, 0)]
    else:
        bounds = [n * i // threads for i in range(threads + 1)]
        rcs = list(_pool(threads, os.getpid()).map(lambda i: call(bounds[i], bounds[i + 1], 1, i), range(threads)))
    if any(rcs):
        raise RuntimeError(f"the C kernel refused {what}")
    return threads


def _mean_var(sums: torch.Tensor, count: int) -> torch.Tensor:
    """Mean and biased variance per channel (2, C) from per-thread partial (sum, sum of squares)
    (threads, 2, C) of ``count`` values per channel."""
    total = sums.sum(0) / count
    return torch.stack((total[0], (total[1] - total[0].square()).clamp_min(0.0)))


def train_supported(patches: torch.Tensor, length: int, filters: tuple, kernel: int, pools: tuple) -> bool:
    """Whether the C training kernels compute this architecture and take these windows (else the
    caller uses PyTorch): the same filters, kernel and pools as the kernels are written for."""
    return (tuple(filters) == FILTERS and kernel == KERNEL and tuple(pools) == POOLS
            and patches.device.type == "cpu" and patches.dtype == torch.float32 and patches.shape[1] <= MAX_WINDOW
            and 2 <= length <= MAX_LENGTH)


def conv12_forward(lib: ctypes.CDLL, patches: torch.Tensor, wt1: torch.Tensor, words: torch.Tensor | None,
                   length: int, scale: float, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two convolutions of training (stacked.py) in C, conv1's output kept in cache:
    z = conv2(pad(pool2(dropout(relu(patches @ wt1))))) + b2, before conv2's batch norm.

    patches (B * L, KC) windows; wt1 (KC, M*32) conv1 with its batch norm folded; ``words``
    the dropout mask's random bits (element r * M*32 + c), None in eval mode (then the pool's
    1/2 is ``scale``); w2 (M, 16, 32, K) as Conv1d stores it; b2 (M, 16) -> z (B, L/2, M*16),
    and z's mean and (biased) variance per channel (2, M*16), accumulated in float64.
    """
    patches, wt1 = patches.contiguous(), wt1.contiguous()
    kc, m = wt1.shape[0], w2.shape[0]
    n = patches.shape[0] // length
    w2k = w2.permute(0, 3, 2, 1).contiguous()  # (M, K, 32, 16): a row of output weights per (tap, channel)
    b2 = b2.contiguous()
    z = patches.new_empty(n, length // 2, m * FILTERS[1])
    wp = words.data_ptr() if words is not None else None
    sums = z.new_zeros(_threads(n), 2, z.shape[2], dtype=torch.float64)
    _parallel(lib, n, lambda lo, hi, threads, part: lib.msda_conv12_forward(
        patches.data_ptr(), kc, lo, hi - lo, length, m, wt1.data_ptr(), wp, scale, w2k.data_ptr(), b2.data_ptr(),
        z.data_ptr(), sums[part].data_ptr(), threads),
        f"window {kc}, length {length}, members {m}")
    return z, _mean_var(sums, n * (length // 2))


class BN2(NamedTuple):
    """conv2's output z (B, L, M*16) and its batch norm, applied where it is read (the C kernels'
    ``Bn2``): y = z * a + c per channel; ``mean``/``istd`` the batch statistics (for gradients);
    ``words`` the dropout mask's bits after ReLU (element r * M*16 + ch), None for no dropout,
    then the pool of step pairs takes ``scale`` (1/2)."""

    z: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor
    mean: torch.Tensor | None
    istd: torch.Tensor | None
    words: torch.Tensor | None
    scale: float

    def args(self) -> tuple:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return (ptr(self.z), ptr(self.a), ptr(self.c), ptr(self.mean), ptr(self.istd), ptr(self.words), self.scale)


def conv12_backward(lib: ctypes.CDLL, patches: torch.Tensor, wt1: torch.Tensor, words: torch.Tensor | None,
                    length: int, scale: float, w2: torch.Tensor, bn2: BN2, gh: torch.Tensor,
                    means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight gradients of ``conv12_forward``: conv1's (M*32, KC), conv2's (M, 16, 32, K) and its
    bias's (M, 16). z's gradient is made per sample from ``bn2``, the gradient gh (B, L/4, M*16) of
    the pooled output and ``means`` (2, M*16) of gy and gy * xhat (``conv3_backward``'s sums / rows):
    batch norm's backward, pass 2, never stored."""
    patches, wt1, gh, means = patches.contiguous(), wt1.contiguous(), gh.contiguous(), means.contiguous()
    kc, m = wt1.shape[0], w2.shape[0]
    n = patches.shape[0] // length
    w2t = w2.permute(0, 3, 1, 2).contiguous()  # (M, K, 16, 32)
    threads = _threads(n)
    gw1 = patches.new_zeros(threads, kc, m * FILTERS[0])
    gw2 = patches.new_zeros(threads, m, KERNEL, FILTERS[0], FILTERS[1])
    gb2 = patches.new_zeros(threads, m * FILTERS[1])
    wp = words.data_ptr() if words is not None else None
    _parallel(lib, n, lambda lo, hi, threads, part: lib.msda_conv12_backward(
        patches.data_ptr(), kc, lo, hi - lo, length, m, wt1.data_ptr(), wp, scale, w2t.data_ptr(), *bn2.args(),
        gh.data_ptr(), means.data_ptr(), gw1[part].data_ptr(), gw2[part].data_ptr(), gb2[part].data_ptr(), threads),
        f"window {kc}, length {length}, members {m}")
    return gw1.sum(0).t(), gw2.sum(0).permute(0, 3, 2, 1), gb2.sum(0).view(m, FILTERS[1])


MAX_CONV3_LENGTH = MAX_LENGTH // 4  # longest input of conv3_* (_convstage.c's MAXL3)


def conv3_forward(lib: ctypes.CDLL, bn2: BN2, w3: torch.Tensor, b3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The third convolution of training in C, on conv2's pooled output made from ``bn2`` (never
    stored): w3 (M, 4, 16, K) and b3 (M, 4) as Conv1d stores them -> y (B, M*4, L/4) channel-major,
    and y's mean and (biased) variance per channel (2, M*4), accumulated in float64."""
    w3, b3 = w3.contiguous(), b3.contiguous()
    n, length1, _ = bn2.z.shape
    m, length = w3.shape[0], length1 // 2
    y = bn2.z.new_empty(n, m * FILTERS[2], length)
    sums = y.new_zeros(_threads(n), 2, m * FILTERS[2], dtype=torch.float64)
    z, a, c, _, _, words, scale = bn2.args()
    _parallel(lib, n, lambda lo, hi, threads, part: lib.msda_conv3_forward(
        z, a, c, words, scale, length1, lo, hi - lo, m, w3.data_ptr(), b3.data_ptr(), y.data_ptr(), sums[part].data_ptr(),
        threads), f"length {length}, members {m}")
    return y, _mean_var(sums, n * length)


def conv3_backward(lib: ctypes.CDLL, bn2: BN2, w3: torch.Tensor,
                   gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``conv3_forward`` for gy (B, M*4, L/4): that of conv2's pooled output gh
    (B, L/4, M*16) and w3's (M, 4, 16, K) (b3's is gy summed over samples and steps); and the
    first pass of conv2's batch-norm backward, the sums of gy and gy * xhat over z's rows (2, M*16)."""
    gy = gy.contiguous()
    n, length1, ch = bn2.z.shape
    m = w3.shape[0]
    w3k = w3.transpose(2, 3).contiguous()  # (M, 4, K, 16): a row of input-channel weights per (output, tap)
    gh = bn2.z.new_empty(n, length1 // 2, ch)
    threads = _threads(n)
    gw = gh.new_zeros(threads, *w3k.shape)
    sums = gh.new_zeros(threads, 2, ch)
    _parallel(lib, n, lambda lo, hi, threads, part: lib.msda_conv3_backward(
        *bn2.args(), length1, gy.data_ptr(), lo, hi - lo, m, w3k.data_ptr(), gh.data_ptr(), gw[part].data_ptr(),
        sums[part].data_ptr(), threads), f"length {length1 // 2}, members {m}")
    return gh, gw.sum(0).transpose(2, 3), sums.sum(0)


def bnpoolw_forward(lib: ctypes.CDLL, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor, words: torch.Tensor | None,
                    window: int) -> torch.Tensor:
    """Batch norm (y * a + c per channel), ReLU, dropout and an average pool of ``window`` steps
    (ceil mode: the last window may be shorter), in C: y (B, CH, L) channel-major ->
    (B, CH, ceil(L / window)); ``words`` the dropout mask's bits (element (s * CH + ch) * L + t,
    kept values doubled), None for no dropout."""
    y, a, c = y.contiguous(), a.contiguous(), c.contiguous()
    n, ch, length = y.shape
    out = y.new_empty(n, ch, -(-length // window))
    wp, keep = (words.data_ptr(), 2.0) if words is not None else (None, 1.0)
    _parallel(lib, n, lambda lo, hi, threads, _: lib.msda_bnpoolw_forward(
        y.data_ptr(), lo, hi - lo, length, ch, window, a.data_ptr(), c.data_ptr(), wp, keep, out.data_ptr(), threads),
        f"length {length}, window {window}")
    return out


def bnpoolw_backward(lib: ctypes.CDLL, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor, mean: torch.Tensor,
                     istd: torch.Tensor, words: torch.Tensor | None, window: int, go: torch.Tensor):
    """Gradients of ``bnpoolw_forward`` (training-mode batch norm with batch mean and 1/std
    ``istd``) for go (B, CH, ceil(L / window)): y's, and the sums of gy and gy * xhat per channel
    (the gradients of the batch norm's bias and weight)."""
    y, go = y.contiguous(), go.contiguous()
    n, ch, length = y.shape
    wp, keep = (words.data_ptr(), 2.0) if words is not None else (None, 1.0)
    sums = y.new_zeros(_threads(n), 2, ch)
    args = lambda lo, hi: (y.data_ptr(), lo, hi - lo, length, ch, window, a.data_ptr(), c.data_ptr(),  # noqa: E731
                           mean.data_ptr(), istd.data_ptr(), wp, keep, go.data_ptr())
    what = f"length {length}, window {window}"
    _parallel(lib, n, lambda lo, hi, threads, part: lib.msda_bnpoolw_sums(*args(lo, hi), sums[part].data_ptr(), threads),
              what)
    total = sums.sum(0)
    means = (total / (n * length)).contiguous()
    gz = torch.empty_like(y)
    _parallel(lib, n, lambda lo, hi, threads, _: lib.msda_bnpoolw_backward(*args(lo, hi), means.data_ptr(), gz.data_ptr(),
                                                                         threads), what)
    return gz, total[0], total[1]


MAX_DENSE_WIDTH = 128  # widest dense layer of bnrelu_* (_convstage.c's MAXW); widths are multiples of 16


def bnrelu_forward(lib: ctypes.CDLL, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm and ReLU of stacked dense layers in their own layout, in C:
    y (G, B, W) -> (relu(bn(y)), batch mean (G, W), biased batch variance (G, W))."""
    y = y.contiguous()
    g, b, w = y.shape
    out = torch.empty_like(y)
    mean, var = y.new_empty(g, w), y.new_empty(g, w)
    rc = lib.msda_bnrelu_forward(y.data_ptr(), g, b, w, gamma.contiguous().data_ptr(), beta.contiguous().data_ptr(),
                                 eps, mean.data_ptr(), var.data_ptr(), out.data_ptr(), max(1, min(torch.get_num_threads(), g)))
    if rc:
        raise RuntimeError(f"the C kernel refused width {w}")
    return out, mean, var


def bnrelu_backward(lib: ctypes.CDLL, y: torch.Tensor, out: torch.Tensor, go: torch.Tensor, gamma: torch.Tensor,
                    mean: torch.Tensor, istd: torch.Tensor, bias_grad: bool = False):
    """Gradients of ``bnrelu_forward`` for go (G, B, W): y's, gamma's and beta's (G, W), and with
    ``bias_grad`` that of a bias added before the batch norm (y's gradient summed over the batch)."""
    go = go.contiguous()
    g, b, w = y.shape
    gz = torch.empty_like(y)
    d_gamma, d_beta = y.new_empty(g, w), y.new_empty(g, w)
    d_bias = y.new_empty(g, w) if bias_grad else None
    rc = lib.msda_bnrelu_backward(y.data_ptr(), out.data_ptr(), go.data_ptr(), g, b, w, gamma.contiguous().data_ptr(),
                                  mean.data_ptr(), istd.data_ptr(), gz.data_ptr(), d_gamma.data_ptr(), d_beta.data_ptr(),
                                  None if d_bias is None else d_bias.data_ptr(), max(1, min(torch.get_num_threads(), g)))
    if rc:
        raise RuntimeError(f"the C kernel refused width {w}")
    return (gz, d_gamma, d_beta, d_bias) if bias_grad else (gz, d_gamma, d_beta)
