"""The stacked trainer's convolution stage: the three temporal convolutions of every member.

The first convolution sees the same series in every member: one matrix product for all members,
its batch norm folded into the weights (``SharedConv``), ReLU, dropout and the pairwise pool in
one autograd function; the second is one grouped convolution in steps-major layout, the third one
banded matrix per member (``ToeplitzConv``). On CPU, C kernels (``native``) replace the three
convolutions and their batch norms, ReLUs, dropouts and pools (``NativeConvStage``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msda.network import native
from msda.network.model import KERNEL
from msda.network.ops import (BN_EPS, LinearReluDropoutPool2, ReluDropoutPool2, StackedBN, avg_pool, coin_dropout,
                              coin_words, constant)

class StackedConv(nn.Module):
    """``m`` stacked Conv1d layers (kernel 5, replicate padding) as one grouped convolution.

    Channels are member-major (member 0's channels first).
    """

    def __init__(self, m: int, c_in: int, c_out: int, pool: int):
        super().__init__()
        self.m, self.pool = m, pool
        self.weight = nn.Parameter(torch.zeros(m, c_out, c_in, KERNEL))
        self.bias = nn.Parameter(torch.zeros(m, c_out))
        self.bn = StackedBN((m, c_out))

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
        return ReluDropoutPool2.apply(y, training, 1)


class NativeConvStage(torch.autograd.Function):
    """The three convolutions of training in C, up to conv3's batch norm (``native.py``):

    - conv1 -> ReLU -> dropout -> pool -> conv2 (``conv12_*``), conv1's output (the largest
      activation) only in cache, made again in the backward pass from the windows and the
      dropout mask's random words;
    - conv2's training-mode batch norm, ReLU, dropout and pool, applied where conv3 reads them
      (``conv3_*``): the pooled output is never stored; conv2's batch-norm backward is one pass
      inside conv3's backward (the sums) and one inside conv12's (the gradient of z).

    patches (B * L, KC) and the folded first-layer weights ``fused`` (k*32, KC) as
    ``LinearReluDropoutPool2`` takes them; conv2's weight (k, 16, 32, K), bias (k, 16) and batch
    norm ``bn2`` (its weight and bias ``gamma2``/``beta2`` (k*16) of these members; its running statistics
    move); conv3's weight (k, 4, 16, K) and bias (k, 4) -> conv3's output y (B, k*4, L/4) and its
    mean and variance per channel (float64, no gradient: the next batch norm's backward accounts
    for them).
    """

    @staticmethod
    def forward(ctx, patches, fused, w2, b2, gamma2, beta2, w3, b3, length: int, training: bool, bn2, members, lib):
        wt1 = fused.t().contiguous()
        n = patches.shape[0] // length
        words = coin_words(patches.shape[0] * wt1.shape[1], patches.device) if training else None
        scale = 1.0 if training else 0.5
        z, stats = native.conv12_forward(lib, patches, wt1, words, length, scale, w2, b2)
        mean, var = stats.to(z.dtype)
        bn2.track(mean, var, n * (length // 2), members)
        istd = torch.rsqrt(var + BN_EPS)
        a = (gamma2 * istd).contiguous()
        c = (beta2 - mean * a).contiguous()
        words2 = coin_words(z.numel(), z.device) if training else None
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


class NativeBNPoolW(torch.autograd.Function):
    """Training-mode batch norm (batch ``mean`` and 1/std ``istd`` given), ReLU, dropout and an
    average pool of ``window`` steps (ceil mode), in C (``native.bnpoolw_forward``):
    y (B, C, L) -> (B, C, ceil(L / window)). The backward pass makes the normalised values again."""

    @staticmethod
    def forward(ctx, y, gamma, beta, mean, istd, dropout: bool, window: int, lib) -> torch.Tensor:
        a = gamma * istd
        c = beta - mean * a
        words = coin_words(y.numel(), y.device) if dropout else None
        ctx.save_for_backward(y, a, c, mean, istd, words)
        ctx.lib, ctx.window = lib, window
        return native.bnpoolw_forward(lib, y, a, c, words, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, a, c, mean, istd, words = ctx.saved_tensors
        gz, d_beta, d_gamma = native.bnpoolw_backward(ctx.lib, y, a, c, mean, istd, words, ctx.window, grad)
        return gz, d_gamma, d_beta, None, None, None, None, None


class ToeplitzConv(StackedConv):
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
        taps = replicate_taps(length, x.device, x.dtype)  # (K, L_out, L_in)
        band = torch.einsum("kois,sml->kilom", w, taps).reshape(k, c_in * length, c_out * length)
        xs = x.view(b, length, k, c_in).permute(2, 0, 3, 1).reshape(k, b, c_in * length)
        y = torch.baddbmm(self.bias[members].repeat_interleave(length, dim=1).unsqueeze(1), xs, band)
        y = y.view(k, b, c_out, length).transpose(0, 1).reshape(b, k * c_out, length)
        return avg_pool(coin_dropout(F.relu(self.bn(y, members)), training), self.pool, ceil=True)

    def pooled(self, y: torch.Tensor, stats: torch.Tensor, training: bool, members: slice, lib) -> torch.Tensor:
        """pool(dropout(relu(bn(y)))) of the convolution's output y (B, k * c_out, L) in C, from y's
        mean and variance per channel (``stats``, float64); batch norm in training mode."""
        mean, var = stats.to(y.dtype)
        bn = self.bn
        bn.track(mean, var, y.shape[0] * y.shape[2], members)
        return NativeBNPoolW.apply(y, bn.weight[members].reshape(-1), bn.bias[members].reshape(-1), mean,
                                    torch.rsqrt(var + BN_EPS), training, self.pool, lib)




def replicate_taps(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """taps[s, m, l] = 1 where output step m reads input step l through tap s (replicate padding)."""

    def make() -> torch.Tensor:
        src = (torch.arange(length).unsqueeze(0) + torch.arange(KERNEL).unsqueeze(1) - KERNEL // 2).clamp(0, length - 1)
        return F.one_hot(src, length).to(device=device, dtype=dtype)  # (K, L, L)

    return constant(("taps", length, device, dtype), make)


class SharedConv(StackedConv):
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
        return LinearReluDropoutPool2.apply(patches, self.fused(stats, members), length, training, KERNEL // 2)

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
        scale = gamma * torch.rsqrt(var + BN_EPS)
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
