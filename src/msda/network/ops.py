"""The stacked trainer's building blocks: fair-coin dropout, fused ReLU-dropout-pool autograd
functions, pooling as strided views, and batch norm and linear layers over stacked members.

Dropout is p = 0.5 (the default ``ArchSpec``'s rate): a fair coin is one random bit.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from msda.network.model import DROPOUT

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


assert DROPOUT == 0.5, "the fast dropout below draws fair coins (p = 0.5, the model's rate)"
_BIT_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()  # byte -> its 8 bits
_CONSTANTS: dict[tuple, torch.Tensor] = {}  # small constant tensors per device, made once


def constant(key: tuple, make) -> torch.Tensor:
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


RNG = threading.local()  # .generator: the dropout generator of the StackedEnsemble running in this thread


def coin_words(n: int, device: torch.device) -> torch.Tensor:
    """The random 64-bit words of a fair-coin mask of ``n`` elements (see ``coin_mask``), from the
    running ensemble's generator (``StackedEnsemble.generator``), else torch's global one."""
    generator = getattr(RNG, "generator", None)
    return torch.empty(-(-n // 64), dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)


def coin_slice(words: torch.Tensor, start: int, n: int, dtype: torch.dtype, keep_scale: float = 1.0) -> torch.Tensor:
    """Elements ``start .. start + n`` (start a multiple of 64) of the mask whose bits are ``words``."""
    table = constant(("bits", words.device, dtype, keep_scale), lambda: (_BIT_TABLE * keep_scale).to(device=words.device, dtype=dtype))
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
    return coin_slice(coin_words(n, device), 0, n, dtype, keep_scale).view(shape)


def coin_dropout(x: torch.Tensor, training: bool) -> torch.Tensor:
    if not training:
        return x
    return x * coin_mask(tuple(x.shape), x.device, x.dtype, 2.0)


def pair_views(kept: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second elements of neighbouring pairs along ``dim`` (floor mode), as views."""
    half = kept.shape[dim] // 2
    pairs = kept.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
    return pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)


def pair_sum(kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of neighbouring pairs along ``dim`` (floor mode: a last odd element is dropped)."""
    a, b = pair_views(kept, dim)
    return a + b


def pair_backward(grad: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient of ``pair_sum(relu-and-dropout output)`` with respect to the pre-ReLU input.

    The gradient reaches an element where its kept value is positive (z > 0 and kept by the
    coin): ReLU's backward kernel, broadcasting the pooled gradient over each pair, in one pass.
    """
    half = grad.shape[dim]
    pairs = kept.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
    gz = torch.ops.aten.threshold_backward(grad.unsqueeze(dim + 1), pairs, 0.0).flatten(dim, dim + 1)
    if kept.shape[dim] > 2 * half:
        gz = torch.cat((gz, gz.new_zeros(1).expand_as(kept.narrow(dim, 2 * half, 1))), dim=dim)
    return gz


class ReluDropoutPool2(torch.autograd.Function):
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
        out = pair_sum(kept, dim)
        return out if training else out.mul_(0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return pair_backward(grad if ctx.training else grad * 0.5, kept, ctx.dim), None, None


TILE_BYTES = 2 * 1024 * 1024  # activations of the first convolution are made and used in tiles this size


class LinearReluDropoutPool2(torch.autograd.Function):
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
        words = coin_words(rows * c, patches.device) if training else None
        ctx.save_for_backward(patches, wt, words)
        ctx.training, ctx.length, ctx.per_tile, ctx.pad = training, length, per_tile, pad
        out = patches.new_empty(batch, half + 2 * pad, c)
        core = out[:, pad : pad + half]
        buf = patches.new_empty(min(per_tile, batch) * length, c)
        for a in range(0, batch, per_tile):
            kept = LinearReluDropoutPool2._kept(patches, wt, words, a, min(a + per_tile, batch), length, buf)
            torch.add(*pair_views(kept, 1), out=core[a : a + per_tile])
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
            z.mul_(coin_slice(words, a * length * c, (b - a) * length * c, z.dtype).view_as(z))
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
            kept = LinearReluDropoutPool2._kept(patches, wt, words, a, b, length, buf)
            gz = pair_backward(g, kept, 1)
            grad_w.addmm_(gz.reshape(-1, c).t(), patches[a * length : b * length])
        return None, grad_w, None, None, None


def avg_pool(x: torch.Tensor, window: int, ceil: bool = False) -> torch.Tensor:
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


class StackedBN(nn.Module):
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
        StackedBN.track_many([(self, members, mean, var)], n)

    @staticmethod
    @torch.no_grad()
    def track_many(updates: list[tuple["StackedBN", slice, torch.Tensor, torch.Tensor]], n: int) -> None:
        """``track`` for several (batch norm, members, mean, var), in three foreach calls."""
        means = [bn.running_mean[members].view(-1) for bn, members, _, _ in updates]
        variances = [bn.running_var[members].view(-1) for bn, members, _, _ in updates]
        torch._foreach_lerp_(means, [mean.reshape(-1) for _, _, mean, _ in updates], BN_MOMENTUM)
        torch._foreach_lerp_(variances, [var.reshape(-1) * (n / (n - 1)) for _, _, _, var in updates], BN_MOMENTUM)
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
            BN_MOMENTUM,
            BN_EPS,
        )


class StackedLinear(nn.Module):
    """``g`` stacked Linear layers, weights (g, out, in) as in ``nn.Linear``."""

    def __init__(self, g: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(g, n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(g, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (g, B, in) -> (g, B, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
