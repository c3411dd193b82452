"""All members of a DenseSM-E as stacked tensors, so that one step trains every member.

Training 25 members one after another (as the authors' code does) costs thousands of small
PyTorch calls per batch. Here the members share each batch and their parameters are stacked:

- the first convolution sees the same series in every member: one matrix product for all
  members, its batch norm folded into the weights (``_SharedConv``), ReLU, dropout and the
  pairwise pool in one autograd function;
- the second convolution is one grouped convolution in steps-major layout, the third one
  banded matrix per member (``_ToeplitzConv``); on CPU, C kernels (``native.py``) replace the
  three convolutions and their batch norms, ReLUs, dropouts and pools in training;
- the dense blocks are grouped (widths 8-32 share a group, zero-padded to 32; 64 and 128 have
  their own): block k of every member of a group that is deeper than k is one batched product;
- the bottlenecks of a group take inputs of different lengths (30 + d*w); they are zero-padded
  at the front to the deepest member's length. Padded weights see only zero inputs (or feed
  zero weights), so their gradients, Adam moments and updates are exactly zero: they stay zero;
- activations are processed in member chunks under 30 MiB (``CHUNK_BYTES``).

The mathematics is that of independent members: each member's loss depends only on its own
parameters, so the gradient of the summed loss is each member's own gradient, and one Adam over
all stacked parameters is one Adam per member. ``tests/test_stacked.py`` checks outputs,
features and gradients against the per-member ``DenseSM`` modules.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msda import native
from msda.errors import MsdaError
from msda.model import CONV_FILTERS, DROPOUT, KERNEL, POOL_WINDOWS, DenseSM, DenseSME, MemberSpec
from msda.schema import FeatureSchema

_BN_MOMENTUM = 0.1
_BN_EPS = 1e-5
MERGE_WIDTH = 32  # members this narrow share one dense group (zero-padded to its widest)
CHUNK_BYTES = 30 * 1024 * 1024  # under glibc's largest mmap threshold (32 MiB)


assert DROPOUT == 0.5, "the fast dropout below draws fair coins (p = 0.5, the model's rate)"
_BIT_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()  # byte -> its 8 bits
_CONSTANTS: dict[tuple, torch.Tensor] = {}  # small constant tensors per device, made once


def _constant(key: tuple, make) -> torch.Tensor:
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


_RNG = threading.local()  # .generator: the dropout generator of the StackedEnsemble running in this thread


def _coin_words(n: int, device: torch.device) -> torch.Tensor:
    """The random 64-bit words of a fair-coin mask of ``n`` elements (see ``coin_mask``), from the
    running ensemble's generator (``StackedEnsemble.generator``), else torch's global one."""
    generator = getattr(_RNG, "generator", None)
    return torch.empty(-(-n // 64), dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)


def _coin_slice(words: torch.Tensor, start: int, n: int, dtype: torch.dtype, keep_scale: float = 1.0) -> torch.Tensor:
    """Elements ``start .. start + n`` (start a multiple of 64) of the mask whose bits are ``words``."""
    table = _constant(("bits", words.device, dtype, keep_scale), lambda: (_BIT_TABLE * keep_scale).to(device=words.device, dtype=dtype))
    part = words[start // 64 : -(-(start + n) // 64)]
    return table.index_select(0, part.view(torch.uint8).int()).view(-1)[:n]


def coin_mask(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, keep_scale: float) -> torch.Tensor:
    """Dropout mask for p = 0.5: each element is 0 or ``keep_scale`` with probability 1/2.

    A fair coin is one random bit: 64-bit random words are split into bytes and each byte is
    looked up in a byte -> 8 bits table. This is ~10x faster on CPU than ``bernoulli_``, which
    draws one float per element; the distribution is the same (independent Bernoulli(1/2)).
    Drawn from torch's global generator.
    """
    n = math.prod(shape)
    return _coin_slice(_coin_words(n, device), 0, n, dtype, keep_scale).view(shape)


def _dropout(x: torch.Tensor, training: bool) -> torch.Tensor:
    if not training:
        return x
    return x * coin_mask(tuple(x.shape), x.device, x.dtype, 2.0)


def _pairs(kept: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second elements of neighbouring pairs along ``dim`` (floor mode), as views."""
    half = kept.shape[dim] // 2
    pairs = kept.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
    return pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)


def _pair_sum(kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of neighbouring pairs along ``dim`` (floor mode: a last odd element is dropped)."""
    a, b = _pairs(kept, dim)
    return a + b


def _pair_backward(grad: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient of ``_pair_sum(relu-and-dropout output)`` with respect to the pre-ReLU input.

    The gradient reaches an element where its kept value is positive (z > 0 and kept by the
    coin): ReLU's backward kernel, broadcasting the pooled gradient over each pair, in one pass.
    """
    half = grad.shape[dim]
    pairs = kept.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
    gz = torch.ops.aten.threshold_backward(grad.unsqueeze(dim + 1), pairs, 0.0).flatten(dim, dim + 1)
    if kept.shape[dim] > 2 * half:
        gz = torch.cat((gz, gz.new_zeros(1).expand_as(kept.narrow(dim, 2 * half, 1))), dim=dim)
    return gz


class _ReluDropoutPool2(torch.autograd.Function):
    """avg_pool(dropout(relu(z)), 2) along axis ``dim`` (floor mode), dropout p = 0.5.

    Dropout's x2 and the pool's /2 cancel, so in training the output is the sum of kept pairs.
    The backward pass keeps one tensor (the kept values) instead of three and is one pass.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, training: bool, dim: int) -> torch.Tensor:
        dim = dim % z.dim()
        kept = F.relu(z)
        if training:
            kept = kept.mul_(coin_mask(tuple(z.shape), z.device, z.dtype, 1.0))
        ctx.save_for_backward(kept)
        ctx.training, ctx.dim = training, dim
        out = _pair_sum(kept, dim)
        return out if training else out.mul_(0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return _pair_backward(grad if ctx.training else grad * 0.5, kept, ctx.dim), None, None


TILE_BYTES = 2 * 1024 * 1024  # activations of the first convolution are made and used in tiles this size


class _LinearReluDropoutPool2(torch.autograd.Function):
    """pool2(dropout(relu(patches @ w.T))) over steps, for the first convolution, in tiles,
    returned replicate-padded by ``pad`` steps on each side for the next convolution.

    ``patches`` (B * L, c_in * K + 1) carry a column of ones and ``w`` the bias as its last
    column, so the bias gradient comes out of the weight gradient. The activation (B * L rows of
    all members' channels, the largest of the model) is never stored: it is made a few samples
    at a time in a buffer that stays in cache, and the backward pass makes it again from the
    patches and the dropout mask's random words (1 bit per element) instead of reading it back
    from memory. Twice the arithmetic of this small product, a fraction of the memory traffic.
    The pooled output is written straight into the padded tensor (no concatenation to pad it);
    the gradients of the padding fold back onto the first and last steps.
    """

    @staticmethod
    def forward(ctx, patches: torch.Tensor, w: torch.Tensor, length: int, training: bool, pad: int = 0):
        rows, c = patches.shape[0], w.shape[0]
        batch, half = rows // length, length // 2
        # even: tiles start on whole mask words; a GPU has no use for cache-sized tiles
        per_tile = max(2, batch) if patches.is_cuda else max(2, TILE_BYTES // (4 * c * length) // 2 * 2)
        wt = w.t().contiguous()
        words = _coin_words(rows * c, patches.device) if training else None
        ctx.save_for_backward(patches, wt, words)
        ctx.training, ctx.length, ctx.per_tile, ctx.pad = training, length, per_tile, pad
        out = patches.new_empty(batch, half + 2 * pad, c)
        core = out[:, pad : pad + half]
        buf = patches.new_empty(min(per_tile, batch) * length, c)
        for a in range(0, batch, per_tile):
            kept = _LinearReluDropoutPool2._kept(patches, wt, words, a, min(a + per_tile, batch), length, buf)
            torch.add(*_pairs(kept, 1), out=core[a : a + per_tile])
        if not training:
            core.mul_(0.5)
        if pad:
            out[:, :pad] = core[:, :1]
            out[:, pad + half :] = core[:, -1:]
        return out

    @staticmethod
    def _kept(patches, wt, words, a: int, b: int, length: int, buf: torch.Tensor) -> torch.Tensor:
        """relu(z) * coin of samples a..b, as (b - a, L, c), in ``buf``."""
        c = wt.shape[1]
        z = torch.mm(patches[a * length : b * length], wt, out=buf[: (b - a) * length]).relu_()
        if words is not None:
            z.mul_(_coin_slice(words, a * length * c, (b - a) * length * c, z.dtype).view_as(z))
        return z.view(b - a, length, c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        patches, wt, words = ctx.saved_tensors
        length, per_tile, pad = ctx.length, ctx.per_tile, ctx.pad
        batch, c, half = patches.shape[0] // length, wt.shape[1], length // 2
        scale = 1.0 if ctx.training else 0.5
        grad_w = patches.new_zeros(c, patches.shape[1])
        buf = patches.new_empty(min(per_tile, batch) * length, c)
        for a in range(0, batch, per_tile):
            b = min(a + per_tile, batch)
            g = grad[a:b, pad : pad + half] * scale  # a tile-sized copy
            if pad:  # the padding's gradients fold onto the edges (both onto one step when half = 1)
                g[:, 0] += grad[a:b, :pad].sum(1) * scale
                g[:, -1] += grad[a:b, pad + half :].sum(1) * scale
            kept = _LinearReluDropoutPool2._kept(patches, wt, words, a, b, length, buf)
            gz = _pair_backward(g, kept, 1)
            grad_w.addmm_(gz.reshape(-1, c).t(), patches[a * length : b * length])
        return None, grad_w, None, None, None


def _avg_pool(x: torch.Tensor, window: int, ceil: bool = False) -> torch.Tensor:
    """``F.avg_pool1d`` on the last axis as a sum of strided views (several times faster on CPU)."""
    length = x.shape[-1]
    full = length // window
    y = x[..., 0 : full * window : window]
    for k in range(1, window):
        y = y + x[..., k : full * window : window]
    y = y * (1.0 / window)
    if ceil and length % window:
        y = torch.cat((y, x[..., full * window :].mean(dim=-1, keepdim=True)), dim=-1)
    return y


class _BN(nn.Module):
    """Batch norm of ``n`` stacked channels (members x channels), flattened for ``F.batch_norm``."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def track(self, mean: torch.Tensor, var: torch.Tensor, n: int, members: slice = slice(None)) -> None:
        """Move the running statistics of ``members`` as batch norm does, from a batch of n values
        per channel with this mean and biased variance (for batch norms computed elsewhere)."""
        _BN.track_many([(self, members, mean, var)], n)

    @staticmethod
    @torch.no_grad()
    def track_many(updates: list[tuple["_BN", slice, torch.Tensor, torch.Tensor]], n: int) -> None:
        """``track`` for several (batch norm, members, mean, var), in three foreach calls."""
        means = [bn.running_mean[members].view(-1) for bn, members, _, _ in updates]
        variances = [bn.running_var[members].view(-1) for bn, members, _, _ in updates]
        torch._foreach_lerp_(means, [mean.reshape(-1) for _, _, mean, _ in updates], _BN_MOMENTUM)
        torch._foreach_lerp_(variances, [var.reshape(-1) * (n / (n - 1)) for _, _, _, var in updates], _BN_MOMENTUM)
        # once per step, not once per member chunk
        steps = [bn.num_batches_tracked for bn, members, _, _ in updates if members.start in (None, 0)]
        if steps:
            torch._foreach_add_(steps, 1)

    def forward(self, x2d: torch.Tensor, members: slice = slice(None)) -> torch.Tensor:
        """``x2d``: (rows, channels[, length]), the channels of ``members``; statistics over rows (and length)."""
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x2d,
            self.running_mean[members].view(-1),
            self.running_var[members].view(-1),
            self.weight[members].reshape(-1),
            self.bias[members].reshape(-1),
            self.training,
            _BN_MOMENTUM,
            _BN_EPS,
        )


class _Linear(nn.Module):
    """``g`` stacked Linear layers, weights (g, out, in) as in ``nn.Linear``."""

    def __init__(self, g: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(g, n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(g, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (g, B, in) -> (g, B, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class _Conv(nn.Module):
    """``m`` stacked Conv1d layers (kernel 5, replicate padding) as one grouped convolution.

    Channels are member-major (member 0's channels first).
    """

    def __init__(self, m: int, c_in: int, c_out: int, pool: int):
        super().__init__()
        self.m, self.pool = m, pool
        self.weight = nn.Parameter(torch.zeros(m, c_out, c_in, KERNEL))
        self.bias = nn.Parameter(torch.zeros(m, c_out))
        self.bn = _BN((m, c_out))

    def forward(self, padded: torch.Tensor, training: bool, members: slice) -> torch.Tensor:
        """padded: (B, L + 4, k * c_in), replicate-padded by the layer before ->
        pool2(dropout(relu(bn(conv(x))))) as (B, L / 2, k * c_out).

        Steps-major ("NWC") layout throughout: oneDNN's grouped convolution runs ~1.7x faster
        on channels-last tensors, and batch norm on (B * L, channels) rows is vectorised.
        """
        w = self.weight[members]
        k = w.shape[0]
        b, length = padded.shape[0], padded.shape[1] - 2 * (KERNEL // 2)
        x4 = padded.permute(0, 2, 1).unsqueeze(2)  # (B, k*c_in, 1, L+4), channels-last strides
        w4 = w.flatten(0, 1).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x4, w4, self.bias[members].flatten(), groups=k)  # (B, k*c_out, 1, L)
        y = y.squeeze(2).permute(0, 2, 1).reshape(b * length, -1)  # (B*L, k*c_out), no copy
        y = self.bn(y, members).view(b, length, -1)
        return _ReluDropoutPool2.apply(y, training, 1)


class _NativeConvStage(torch.autograd.Function):
    """The three convolutions of training in C, up to conv3's batch norm (``native.py``):

    - conv1 -> ReLU -> dropout -> pool -> conv2 (``conv12_*``), conv1's output (the largest
      activation) only in cache, made again in the backward pass from the windows and the
      dropout mask's random words;
    - conv2's training-mode batch norm, ReLU, dropout and pool, applied where conv3 reads them
      (``conv3_*``): the pooled output is never stored; conv2's batch-norm backward is one pass
      inside conv3's backward (the sums) and one inside conv12's (the gradient of z).

    patches (B * L, KC) and the folded first-layer weights ``fused`` (k*32, KC) as
    ``_LinearReluDropoutPool2`` takes them; conv2's weight (k, 16, 32, K), bias (k, 16) and batch
    norm ``bn2`` (its weight and bias ``gamma2``/``beta2`` (k*16) of these members; its running statistics
    move); conv3's weight (k, 4, 16, K) and bias (k, 4) -> conv3's output y (B, k*4, L/4) and its
    mean and variance per channel (float64, no gradient: the next batch norm's backward accounts
    for them).
    """

    @staticmethod
    def forward(ctx, patches, fused, w2, b2, gamma2, beta2, w3, b3, length: int, training: bool, bn2, members, lib):
        wt1 = fused.t().contiguous()
        n = patches.shape[0] // length
        words = _coin_words(patches.shape[0] * wt1.shape[1], patches.device) if training else None
        scale = 1.0 if training else 0.5
        z, stats = native.conv12_forward(lib, patches, wt1, words, length, scale, w2, b2)
        mean, var = stats.to(z.dtype)
        bn2.track(mean, var, n * (length // 2), members)
        istd = torch.rsqrt(var + _BN_EPS)
        a = (gamma2 * istd).contiguous()
        c = (beta2 - mean * a).contiguous()
        words2 = _coin_words(z.numel(), z.device) if training else None
        q = native.BN2(z, a, c, mean.contiguous(), istd.contiguous(), words2, scale)
        y, y_stats = native.conv3_forward(lib, q, w3, b3)
        ctx.save_for_backward(patches, wt1, words, w2, w3, z, a, c, q.mean, q.istd, words2)
        ctx.length, ctx.scale, ctx.lib = length, scale, lib
        ctx.mark_non_differentiable(y_stats)
        return y, y_stats

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        patches, wt1, words, w2, w3, z, a, c, mean, istd, words2 = ctx.saved_tensors
        q = native.BN2(z, a, c, mean, istd, words2, ctx.scale)
        gh, g3, sums = native.conv3_backward(ctx.lib, q, w3, grad)
        rows = z.shape[0] * z.shape[1]
        g1, g2, gb2 = native.conv12_backward(ctx.lib, patches, wt1, words, ctx.length, ctx.scale, w2, q, gh, sums / rows)
        # batch norm's parameters: sum(gy * xhat) and sum(gy), per channel
        return (None, g1, g2, gb2, sums[1], sums[0], g3,
                grad.sum((0, 2)).view_as(w3[:, :, 0, 0]), None, None, None, None, None)


class _NativeBNPoolW(torch.autograd.Function):
    """Training-mode batch norm (batch ``mean`` and 1/std ``istd`` given), ReLU, dropout and an
    average pool of ``window`` steps (ceil mode), in C (``native.bnpoolw_forward``):
    y (B, C, L) -> (B, C, ceil(L / window)). The backward pass makes the normalised values again."""

    @staticmethod
    def forward(ctx, y, gamma, beta, mean, istd, dropout: bool, window: int, lib) -> torch.Tensor:
        a = gamma * istd
        c = beta - mean * a
        words = _coin_words(y.numel(), y.device) if dropout else None
        ctx.save_for_backward(y, a, c, mean, istd, words)
        ctx.lib, ctx.window = lib, window
        return native.bnpoolw_forward(lib, y, a, c, words, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, a, c, mean, istd, words = ctx.saved_tensors
        gz, d_beta, d_gamma = native.bnpoolw_backward(ctx.lib, y, a, c, mean, istd, words, ctx.window, grad)
        return gz, d_gamma, d_beta, None, None, None, None, None


class _ToeplitzConv(_Conv):
    """A short convolution as one matrix per member: (c_in x L) -> (c_out x L).

    For the last layer (16 -> 4 channels on 11 steps) the convolution kernels are too small
    for oneDNN to run well (its backward pass took ~8x its arithmetic); the equivalent banded
    matrix (replicate padding included) runs as one batched matrix product over the members.
    """

    def forward(self, x: torch.Tensor, training: bool, members: slice) -> torch.Tensor:
        """x: (B, L, k * c_in) -> pool(dropout(relu(bn(conv(x))))) as (B, k * c_out, L') (channels first)."""
        b, length, _ = x.shape
        w = self.weight[members]  # (k, c_out, c_in, K)
        k, c_out, c_in, _ = w.shape
        taps = _replicate_taps(length, x.device, x.dtype)  # (K, L_out, L_in)
        band = torch.einsum("kois,sml->kilom", w, taps).reshape(k, c_in * length, c_out * length)
        xs = x.view(b, length, k, c_in).permute(2, 0, 3, 1).reshape(k, b, c_in * length)
        y = torch.baddbmm(self.bias[members].repeat_interleave(length, dim=1).unsqueeze(1), xs, band)
        y = y.view(k, b, c_out, length).transpose(0, 1).reshape(b, k * c_out, length)
        return _avg_pool(_dropout(F.relu(self.bn(y, members)), training), self.pool, ceil=True)

    def pooled(self, y: torch.Tensor, stats: torch.Tensor, training: bool, members: slice, lib) -> torch.Tensor:
        """pool(dropout(relu(bn(y)))) of the convolution's output y (B, k * c_out, L) in C, from y's
        mean and variance per channel (``stats``, float64); batch norm in training mode."""
        mean, var = stats.to(y.dtype)
        bn = self.bn
        bn.track(mean, var, y.shape[0] * y.shape[2], members)
        return _NativeBNPoolW.apply(y, bn.weight[members].reshape(-1), bn.bias[members].reshape(-1), mean,
                                    torch.rsqrt(var + _BN_EPS), training, self.pool, lib)


def _dense_columns(n_in: int, k: int, width: int, slot: int) -> torch.Tensor:
    """Where the inputs of a module's dense block k ([h_k .. h_1, base], blocks of ``width``)
    sit in the stacked layout, whose blocks are ``slot`` wide."""
    c = torch.arange(k * width)
    return torch.cat(((c // width) * slot + c % width, k * slot + torch.arange(n_in)))


def _replicate_taps(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """taps[s, m, l] = 1 where output step m reads input step l through tap s (replicate padding)."""

    def make() -> torch.Tensor:
        src = (torch.arange(length).unsqueeze(0) + torch.arange(KERNEL).unsqueeze(1) - KERNEL // 2).clamp(0, length - 1)
        return F.one_hot(src, length).to(device=device, dtype=dtype)  # (K, L, L)

    return _constant(("taps", length, device, dtype), make)


class _SharedConv(_Conv):
    """The first convolution: every member sees the same series, so its batch norm folds.

    The batch statistics of the outputs follow from the weights and the statistics of the input
    patches: mean = W mu + b and var = diag(W Sigma W^T), with mu and Sigma (15 x 15 for three
    series) the mean and covariance of the patches. Folding the normalisation into the weights
    gives the normalised output from one matrix product, without the two passes of batch norm
    over the largest activation; autograd differentiates through mean and var, so gradients are
    those of training-mode batch norm.
    """

    def forward(
        self,
        patches: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor, int] | None,
        training: bool,
        members: slice,
        length: int,
    ) -> torch.Tensor:
        """patches (B * L, c_in * K + 1); stats (mu, Sigma, n) of the windows in training mode, else None.

        Returns pool(dropout(relu(bn(conv)))) replicate-padded for the next convolution: (B, L / 2 + 4, k * c_out).
        """
        return _LinearReluDropoutPool2.apply(patches, self.fused(stats, members), length, training, KERNEL // 2)

    def fused(self, stats: tuple[torch.Tensor, torch.Tensor, int] | None, members: slice) -> torch.Tensor:
        """The weights (k * c_out, c_in * K + 1) with batch norm folded in and the bias as the last
        column; with ``stats`` (training), the running statistics move as batch norm's would."""
        w = self.weight[members].flatten(2).flatten(0, 1)  # (k * c_out, c_in * K)
        b = self.bias[members].flatten()
        bn = self.bn
        gamma, beta = bn.weight[members].flatten(), bn.bias[members].flatten()
        if stats is not None:
            mu, sigma, n = stats
            mean = w @ mu + b
            var = ((w @ sigma) * w).sum(dim=1)
            bn.track(mean.detach(), var.detach(), n, members)
        else:
            mean, var = bn.running_mean[members].flatten(), bn.running_var[members].flatten()
        scale = gamma * torch.rsqrt(var + _BN_EPS)
        return torch.cat((w * scale[:, None], ((b - mean) * scale + beta)[:, None]), dim=1)

    @staticmethod
    def patches(series: torch.Tensor, training: bool):
        """Replicate-padded windows (B * L, c_in * K + 1), the last column ones (for the bias),
        and, in training mode, the mean and covariance of the windows."""
        b, c, length = series.shape
        pad = F.pad(series, (KERNEL // 2, KERNEL // 2), mode="replicate")
        windows = pad.unfold(2, KERNEL, 1).permute(0, 2, 1, 3).reshape(b * length, c * KERNEL)
        p = torch.cat((windows, windows.new_ones(b * length, 1)), dim=1)
        if not training:
            return p, None
        n = windows.shape[0]
        mu = windows.sum(0, dtype=torch.float64) / n  # the mean in float64, the centred product in the
        centred = windows - mu.to(windows.dtype)  # model's dtype: its values are O(1) (~8x faster on CPU)
        sigma = (centred.T @ centred).double() / n
        return p, (mu.to(series.dtype), sigma.to(series.dtype), n)


class _WidthGroup(nn.Module):
    """The dense blocks, bottlenecks and outputs of a group of members, depths ascending.

    Every member of the group is stored at the group's ``width``; a narrower member (``widths``)
    fills the first channels of each block and its other channels are zero weights. Those
    channels output batch norm of a constant 0, i.e. 0, after ReLU; ReLU's zero slope there
    and the zero weights that read them give all padded parameters zero gradients, so they stay
    as they are (the narrow widths 8, 16 and 32 share one group: fewer, larger operations).
    """

    def __init__(self, width: int, depths: list[int], widths: list[int], n_in: int, bottleneck: int):
        super().__init__()
        self.width, self.depths, self.widths, self.n_in = width, depths, widths, n_in
        self.max_in = n_in + max(depths) * width
        blocks = []
        for k in range(max(depths)):
            g = sum(d > k for d in depths)
            k_in = n_in + k * width
            blocks.append(
                nn.ModuleDict(
                    {
                        "linear1": _Linear(g, k_in, width),
                        "linear2": _Linear(g, width, width),
                        "linear3": _Linear(g, width, width),
                        "bn1": _BN((g, width)),
                        "bn2": _BN((g, width)),
                        "bn3": _BN((g, width)),
                    }
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.fc = _Linear(len(depths), self.max_in, bottleneck)
        self.fc_bn = _BN((len(depths), bottleneck))
        self.out = _Linear(len(depths), bottleneck, 1)

    @staticmethod
    def _lbr(x: torch.Tensor, lin: _Linear, bn: _BN) -> torch.Tensor:
        y = lin(x)  # (g, B, w)
        g, b, w = y.shape
        y = bn(y.transpose(0, 1).reshape(b, g * w)).view(b, g, w).transpose(0, 1)
        return F.relu(y)

    def forward(self, h: torch.Tensor, lib=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (g, B, n_in) normalised inputs of the group's members -> (outputs (g, B), features (g, B, 32)).

        With ``lib`` (training on CPU), the blocks run as one autograd function (``_DenseBlocks``)
        with their batch norms and ReLUs in C."""
        if lib is not None and self.training and self.width % 16 == 0 and self.width <= native.MAX_DENSE_WIDTH:
            f = _DenseBlocks.apply(h, self, lib, self.fc.weight, self.fc.bias, *self.block_parameters())
        else:
            f = self.fc(self._blocks(h))
        f = F.relu(f)
        g, b, c = f.shape
        f = self.fc_bn(f.transpose(0, 1).reshape(b, g * c)).view(b, g, c).transpose(0, 1)
        y = self.out(f).squeeze(2)
        return y, f

    def block_parameters(self) -> list[torch.Tensor]:
        """Per block: the three layers' weight and bias, then the three batch norms' weight and bias."""
        return [t for blk in self.blocks for name in ("linear1", "linear2", "linear3", "bn1", "bn2", "bn3")
                for t in (blk[name].weight, blk[name].bias)]

    def _blocks(self, h: torch.Tensor) -> torch.Tensor:
        """The dense blocks with autograd: (g, B, n_in) -> the bottleneck's inputs (g, B, max_in)."""
        finished: list[torch.Tensor] = []
        x = h
        for k, blk in enumerate(self.blocks):
            y = self._lbr(x, blk["linear1"], blk["bn1"])
            y = self._lbr(y, blk["linear2"], blk["bn2"])
            y = self._lbr(y, blk["linear3"], blk["bn3"])
            x = torch.cat((y, x), dim=2)
            n_done = sum(d == k + 1 for d in self.depths)
            if n_done:  # split, not two slices: its backward is one concatenation, not zero-filled copies
                done, x = x.split([n_done, x.shape[0] - n_done])
                finished.append(F.pad(done, (self.max_in - done.shape[2], 0)))
        return torch.cat(finished, dim=0)  # (g, B, max_in), zero-padded at the front


class _DenseBlocks(torch.autograd.Function):
    """The dense blocks and the bottleneck's linear layer of a ``_WidthGroup`` in training mode on
    CPU, forward and backward written out: h (g, B, n_in) -> the bottleneck's pre-activations
    (g, B, 32) (``fc(_WidthGroup._blocks(h))``).

    The blocks write into one buffer X (g, B, max_in), the bottleneck's inputs [h_D .. h_1, base]
    of every member, right-aligned: block k of the members deeper than k (the last g_k of the
    group, depths ascending) reads the columns of X from its start to the end and writes its
    output just before them, so X is the DenseNet concatenation without any concatenation, split
    or padding. The bottleneck reads, for each run of members of one depth, only that depth's
    columns (not the zero padding in front). The backward pass adds the input gradients of each
    block into the matching columns of one gradient buffer. Batch norm and ReLU run in C
    (``native.bnrelu_*``). One autograd node instead of ~15 per block.
    """

    @staticmethod
    def forward(ctx, h, group, lib, fc_w, fc_b, *params):
        g, b, n_in = h.shape
        w, max_in = group.width, group.max_in
        x = h.new_zeros(g, b, max_in)
        x[:, :, max_in - n_in :] = h
        saved, stats = [], []
        for k in range(len(group.blocks)):
            w1, b1, w2, b2, w3, b3, g1, be1, g2, be2, g3, be3 = params[12 * k : 12 * k + 12]
            a, start = g - w1.shape[0], max_in - n_in - k * w
            inp = x[a:, :, start:]
            layer = []
            for weight, bias, gamma, beta in ((w1, b1, g1, be1), (w2, b2, g2, be2), (w3, b3, g3, be3)):
                y = torch.baddbmm(bias.unsqueeze(1), inp, weight.transpose(1, 2))
                inp, mean, var = native.bnrelu_forward(lib, y, gamma, beta, _BN_EPS)
                layer.append((y, inp, mean, torch.rsqrt(var + _BN_EPS)))
                stats.append((mean, var))
            x[a:, :, start - w : start] = inp
            saved.append(layer)
        bns = [blk[name] for blk in group.blocks for name in ("bn1", "bn2", "bn3")]
        _BN.track_many([(bn, slice(None), mean, var) for bn, (mean, var) in zip(bns, stats)], b)
        out = h.new_empty(g, b, fc_w.shape[1])
        for j0, j1, start in _DenseBlocks._runs(group, n_in):
            torch.baddbmm(fc_b[j0:j1].unsqueeze(1), x[j0:j1, :, start:], fc_w[j0:j1, :, start:].transpose(1, 2),
                          out=out[j0:j1])
        ctx.save_for_backward(x, fc_w, *params)
        ctx.layers, ctx.group, ctx.n_in, ctx.lib = saved, group, n_in, lib
        return out

    @staticmethod
    def _runs(group, n_in: int) -> list[tuple[int, int, int]]:
        """(first member, end, first column of X) of each run of members of one depth."""
        runs, j = [], 0
        depths = group.depths
        while j < len(depths):
            e = j
            while e < len(depths) and depths[e] == depths[j]:
                e += 1
            runs.append((j, e, group.max_in - n_in - depths[j] * group.width))
            j = e
        return runs

    @staticmethod
    def backward(ctx, grad_out):
        x, fc_w, *params = ctx.saved_tensors
        w, n_in, lib = ctx.group.width, ctx.n_in, ctx.lib
        g, _, max_in = x.shape
        grad_out = grad_out.contiguous()
        gx = torch.zeros_like(x)  # the input gradients of the bottleneck and of the blocks are added into it
        g_fc = torch.zeros_like(fc_w)
        for j0, j1, start in _DenseBlocks._runs(ctx.group, n_in):
            go = grad_out[j0:j1]
            g_fc[j0:j1, :, start:] = torch.bmm(go.transpose(1, 2), x[j0:j1, :, start:])
            gx[j0:j1, :, start:].baddbmm_(go, fc_w[j0:j1, :, start:])
        grads: list[torch.Tensor | None] = [None] * len(params)
        for k in reversed(range(len(ctx.layers))):
            ws = params[12 * k : 12 * k + 12]
            a, start = g - ws[0].shape[0], max_in - n_in - k * w
            go = gx[a:, :, start - w : start].contiguous()  # complete: every reader of this output is later
            for j in (2, 1, 0):
                y, out, mean, istd = ctx.layers[k][j]
                gamma = ws[6 + 2 * j]
                gz, d_gamma, d_beta, d_bias = native.bnrelu_backward(lib, y, out, go, gamma, mean, istd, bias_grad=True)
                inp = ctx.layers[k][j - 1][1] if j else x[a:, :, start:]
                grads[12 * k + 2 * j] = torch.bmm(gz.transpose(1, 2), inp)
                grads[12 * k + 2 * j + 1] = d_bias
                grads[12 * k + 6 + 2 * j], grads[12 * k + 7 + 2 * j] = d_gamma, d_beta
                if j:
                    go = torch.bmm(gz, ws[2 * j])
                else:
                    gx[a:, :, start:].baddbmm_(gz, ws[0])
        return (gx[:, :, max_in - n_in :], None, None, g_fc, grad_out.sum(1), *grads)


class StackedEnsemble(nn.Module):
    """A DenseSM-E whose members are stacked for joint training (see the module docstring).

    ``forward(x)`` returns each member's prediction (n_members, B) and bottleneck features
    (n_members, B, 32), members in the order of ``specs`` (the ensemble's order).
    """

    def __init__(self, specs: list[MemberSpec], schema: FeatureSchema):
        super().__init__()
        self.specs, self.schema = list(specs), schema
        self.n_scalars, self.n_series, self.length = schema.n_scalars, schema.n_series, schema.series_length
        # dropout draws from this generator when set (one per part trained in its own thread:
        # reproducible whatever the threads' timing), else from torch's global generator
        self.generator: torch.Generator | None = None
        probe = DenseSM(1, 1, schema)
        self.n_in = probe.n_in
        m = len(specs)
        # dense groups: the narrow widths share one group, each wider width has its own;
        # internal order: by group, then depth, so that each group is contiguous
        def group_of(spec: MemberSpec) -> int:
            return max(spec.width, MERGE_WIDTH) if spec.width <= MERGE_WIDTH else spec.width

        keys = sorted({group_of(s) for s in specs})
        self.order = sorted(range(m), key=lambda i: (group_of(specs[i]), specs[i].depth, specs[i].width))
        self.inverse = [self.order.index(i) for i in range(m)]
        self.conv1 = _SharedConv(m, self.n_series, CONV_FILTERS[0], POOL_WINDOWS[0])
        self.conv2 = _Conv(m, CONV_FILTERS[0], CONV_FILTERS[1], POOL_WINDOWS[1])
        self.conv3 = _ToeplitzConv(m, CONV_FILTERS[1], CONV_FILTERS[2], POOL_WINDOWS[2])
        self.norm = _BN((m, self.n_in))
        self.group_sizes = []
        groups = []
        for key in keys:
            members = [specs[i] for i in self.order if group_of(specs[i]) == key]
            slot = max(s.width for s in members)
            groups.append(_WidthGroup(slot, [s.depth for s in members], [s.width for s in members], self.n_in, 32))
            self.group_sizes.append(len(members))
        self.groups = nn.ModuleList(groups)
        self.dropout = True  # tests switch it off to compare with the modules deterministically
        # the C training kernels on CPU (native.py: the three convolutions and their batch norms,
        # the dense layers' batch norms): None where they build, True insists, False never
        self.native: bool | None = None

    # ----- computation -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, internal_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Members in ``specs`` order, or in ``self.order`` (grouped by width) if ``internal_order``."""
        before = getattr(_RNG, "generator", None)
        _RNG.generator = self.generator
        try:
            return self._forward(x, internal_order)
        finally:
            _RNG.generator = before

    def _forward(self, x: torch.Tensor, internal_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        training = self.training and self.dropout
        b = x.shape[0]
        m = len(self.specs)
        scalars = x[:, : self.n_scalars]
        series = x[:, self.n_scalars :].reshape(b, self.n_series, self.length)
        patches, stats = _SharedConv.patches(series, self.training)
        lib = self._library(patches)
        c_conv = (lib is not None and self.conv2.bn.training and self.conv3.bn.training
                  and 1 <= self.length // 4 <= native.MAX_CONV3_LENGTH)
        chunks = [slice(0, m)] if c_conv else self._member_chunks(b)  # C keeps conv1's output in cache
        conv = torch.cat([self._conv_stage(patches, stats, training, part, lib if c_conv else None)
                          for part in chunks], dim=1)
        shared = torch.cat((scalars, series.mean(dim=2)), dim=1)
        base = torch.cat((shared.unsqueeze(1).expand(b, m, shared.shape[1]), conv), dim=2)
        base = self.norm(base.reshape(b, -1)).view(b, m, self.n_in).transpose(0, 1)  # (m, B, n_in)
        outs, feats = [], []
        for part, group in zip(base.split(self.group_sizes), self.groups):
            y, f = group(part, lib)
            outs.append(y)
            feats.append(f)
        y, f = torch.cat(outs, dim=0), torch.cat(feats, dim=0)
        if internal_order:
            return y, f
        return y[self.inverse], f[self.inverse]

    def _member_chunks(self, batch: int) -> list[slice]:
        """Members per convolution pass, so that one activation stays under ``CHUNK_BYTES``.

        Blocks above glibc's largest mmap threshold (32 MiB) are mapped and unmapped on every
        allocation; keeping activations small keeps them in the heap and in cache (~3x faster).
        """
        per_member = batch * CONV_FILTERS[0] * self.length * 4
        k = max(1, min(len(self.specs), CHUNK_BYTES // max(per_member, 1)))
        return [slice(a, min(a + k, len(self.specs))) for a in range(0, len(self.specs), k)]

    def _library(self, patches: torch.Tensor):
        """The C training kernels, or None (PyTorch operations)."""
        if self.native is False:
            return None
        covered = native.train_supported(patches, self.length, CONV_FILTERS, KERNEL, POOL_WINDOWS)
        lib = native.conv_stage_library() if covered else None
        if lib is None and self.native:
            raise MsdaError("native=True: the C convolutions need the default convolution architecture, a float32 "
                            f"model on CPU, series of 2-{native.MAX_LENGTH} steps and a C compiler (see msda/native.py)")
        return lib

    def _conv_stage(self, patches: torch.Tensor, stats, training: bool, part: slice, lib=None) -> torch.Tensor:
        """Temporal features of the members in ``part``: (B, k, 4 * L3), channel-major per member;
        with ``lib``, in C (training mode: the batch norms use batch statistics)."""
        if lib is not None:
            c2, c3 = self.conv2, self.conv3
            y, y_stats = _NativeConvStage.apply(patches, self.conv1.fused(stats, part), c2.weight[part], c2.bias[part],
                                                c2.bn.weight[part].reshape(-1), c2.bn.bias[part].reshape(-1),
                                                c3.weight[part], c3.bias[part],
                                                self.length, training, c2.bn, part, lib)
            h = c3.pooled(y, y_stats, training, part, lib)
        else:
            h = self.conv2(self.conv1(patches, stats, training, part, self.length), training, part)
            h = self.conv3(h, training, part)
        return h.reshape(h.shape[0], part.stop - part.start, -1)

    # ----- conversion ------------------------------------------------------------------------
    def _slots(self):
        """(member index, internal position, group, position in group) for every member."""
        start = 0
        for gi, size in enumerate(self.group_sizes):
            for j in range(size):
                yield self.order[start + j], start + j, self.groups[gi], j
            start += size

    @torch.no_grad()
    def _copy(self, members: list[DenseSM], to_stack: bool) -> None:
        def move(stacked: torch.Tensor, index, module_tensor: torch.Tensor) -> None:
            if to_stack:
                stacked[index].copy_(module_tensor)
            else:
                module_tensor.copy_(stacked[index])

        def bn(stacked: _BN, index, mod: nn.BatchNorm1d) -> None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                move(getattr(stacked, name), index, getattr(mod, name))
            if to_stack:
                stacked.num_batches_tracked.copy_(torch.maximum(stacked.num_batches_tracked, mod.num_batches_tracked))
            else:
                mod.num_batches_tracked.copy_(stacked.num_batches_tracked)

        def dense(stacked: torch.Tensor, index: int, rows: int, cols: torch.Tensor, module_tensor: torch.Tensor) -> None:
            view = stacked[index, :rows]
            if to_stack:
                view[:, cols] = module_tensor
            else:
                module_tensor.copy_(view[:, cols])

        for i, pos, group, j in self._slots():
            mod = members[i]
            w, s = mod.width, group.width
            same = torch.arange(w)
            cb = mod.conv_block
            for conv, mconv, mbn in ((self.conv1, cb.conv1, cb.bn1), (self.conv2, cb.conv2, cb.bn2), (self.conv3, cb.conv3, cb.bn3)):
                move(conv.weight, pos, mconv.weight)
                move(conv.bias, pos, mconv.bias)
                bn(conv.bn, pos, mbn)
            bn(self.norm, pos, mod.norm)
            depth = mod.depth
            for k in range(depth):
                blk = group.blocks[k]
                # the member's slot in block k: members deeper than k, in ascending depth order
                slot = j - sum(d <= k for d in group.depths)
                layer = mod.dense_layers[k]
                dense(blk["linear1"].weight, slot, w, _dense_columns(self.n_in, k, w, s), layer.linear1.weight)
                dense(blk["linear2"].weight, slot, w, same, layer.linear2.weight)
                dense(blk["linear3"].weight, slot, w, same, layer.linear3.weight)
                for name in ("linear1", "linear2", "linear3"):
                    move(blk[name].bias[slot], slice(0, w), getattr(layer, name).bias)
                for name in ("bn1", "bn2", "bn3"):
                    bn(blk[name], (slot, slice(0, w)), getattr(layer, name))
            fc = mod.fc_layers[0]
            if to_stack:
                group.fc.weight[j].zero_()
            offset = group.max_in - (self.n_in + depth * s)
            dense(group.fc.weight, j, fc.linear1.weight.shape[0], offset + _dense_columns(self.n_in, depth, w, s), fc.linear1.weight)
            move(group.fc.bias, j, fc.linear1.bias)
            bn(group.fc_bn, j, fc.bn1)
            move(group.out.weight, j, mod.out.weight)
            move(group.out.bias, j, mod.out.bias)

    @classmethod
    def from_ensemble(cls, ensemble: DenseSME) -> "StackedEnsemble":
        """The members of ``ensemble`` stacked (same device and dtype); the ensemble is not changed."""
        ref = next(ensemble.parameters())
        stacked = cls(ensemble.specs, ensemble.schema).to(device=ref.device, dtype=ref.dtype)
        stacked._copy(list(ensemble.members), to_stack=True)
        return stacked

    def to_ensemble(self) -> DenseSME:
        """A fresh ``DenseSME`` (on the CPU, this dtype, eval mode) holding the stacked parameters."""
        dtype = next(self.parameters()).dtype
        ensemble = DenseSME(self.specs, schema=self.schema).to(dtype=dtype)
        cpu = StackedEnsemble(self.specs, self.schema).to(dtype=dtype)
        cpu.load_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})
        cpu._copy(list(ensemble.members), to_stack=False)
        return ensemble.eval()


def member_cost(spec: MemberSpec, n_in: int = 30) -> int:
    """Multiply-adds per sample of one member with the default schema (convolutions on 3 x 46
    steps, dense layers), for load balancing."""
    conv = 46 * 15 * 32 + 23 * 160 * 16 + 11 * 80 * 4
    dense = sum((n_in + k * spec.width) * spec.width + 2 * spec.width**2 for k in range(spec.depth))
    return conv + dense + (n_in + spec.depth * spec.width) * 32


def split_members(specs: list[MemberSpec], parts: int) -> list[list[int]]:
    """Member indices in ``parts`` groups of about equal cost, each sorted; deterministic.

    Greedy (largest first, to the lightest group), then single moves and pairwise swaps out of
    the heaviest group while they lower it: the parts wait for the slower one, so they should
    cost the same."""
    parts = max(1, min(parts, len(specs)))
    cost = [member_cost(s) for s in specs]
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(specs)), key=lambda i: (-cost[i], i)):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += cost[i]
    improved = parts > 1
    while improved:
        improved = False
        h = load.index(max(load))
        best = (load[h], None)  # the heavier of the two groups after a change: lower is better
        for o in range(parts):
            if o == h:
                continue
            for i in groups[h]:
                for j in [None] + groups[o]:
                    d = cost[i] - (cost[j] if j is not None else 0)
                    if 0 < d and max(load[h] - d, load[o] + d) < best[0]:
                        best = (max(load[h] - d, load[o] + d), (o, i, j, d))
        if best[1] is not None:
            o, i, j, d = best[1]
            groups[h].remove(i)
            groups[o].append(i)
            if j is not None:
                groups[o].remove(j)
                groups[h].append(j)
            load[h] -= d
            load[o] += d
            improved = True
    return [sorted(g) for g in groups]


class PartedEnsemble(nn.Module):
    """An ensemble's members split into ``StackedEnsemble`` parts that train side by side.

    On a CPU, PyTorch's own threading of one stacked step leaves cores idle while Python
    dispatches its ~2,000 small operations; two parts, each stepped by its own thread with its
    own share of the cores, overlap one part's dispatch with the other's arithmetic
    (``transfer.fit``). Members stay independent, so the split changes no mathematics; each part
    draws its dropout from its own generator, so results do not depend on the threads' timing.

    ``order``: the members (indices into ``specs``) in the parts' internal orders, concatenated.
    """

    def __init__(self, specs: list[MemberSpec], schema: FeatureSchema, members: list[list[int]]):
        super().__init__()
        self.specs, self.schema, self.members = list(specs), schema, [list(g) for g in members]
        self.parts = nn.ModuleList(StackedEnsemble([specs[i] for i in g], schema) for g in self.members)
        self.order = [g[i] for g, part in zip(self.members, self.parts) for i in part.order]
        self.inverse = [self.order.index(i) for i in range(len(specs))]

    @staticmethod
    def covers(ensemble: DenseSME) -> bool:
        """Whether the stacked trainer computes the ensemble's architecture: the default spec only
        (its convolution stage and the C kernels are written for it)."""
        return ensemble.arch.is_default

    @classmethod
    def from_ensemble(cls, ensemble: DenseSME, parts: int = 1, seed: int | None = None,
                      device: torch.device | str | None = None) -> "PartedEnsemble":
        """The members of ``ensemble`` (not changed) in ``parts`` cost-balanced parts, on ``device``
        (default: the ensemble's); with ``seed``, part k's dropout draws from a generator seeded
        with (seed, k)."""
        members = split_members(ensemble.specs, parts)
        ref = next(ensemble.parameters())
        parted = cls(ensemble.specs, ensemble.schema, members).to(device=ref.device, dtype=ref.dtype)
        for g, part in zip(members, parted.parts):
            part._copy([ensemble.members[i] for i in g], to_stack=True)
        parted = parted.to(device or ref.device)
        if seed is not None:
            for k, part in enumerate(parted.parts):
                part.generator = torch.Generator(device=device or ref.device)
                part.generator.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        return parted

    def forward(self, x: torch.Tensor, internal_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (m, B) and features (m, B, 32) of all members, as ``StackedEnsemble.forward``."""
        outs = [part(x, internal_order=True) for part in self.parts]
        y, f = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return (y, f) if internal_order else (y[self.inverse], f[self.inverse])

    def to_ensemble(self) -> DenseSME:
        """A fresh ``DenseSME`` (CPU, eval mode) holding the parts' parameters, members in ``specs`` order."""
        dtype = next(self.parameters()).dtype
        ensemble = DenseSME(self.specs, schema=self.schema).to(dtype=dtype)
        for g, part in zip(self.members, self.parts):
            for i, member in zip(g, part.to_ensemble().members):
                ensemble.members[i].load_state_dict(member.state_dict())
        return ensemble.eval()
