"""The stacked trainer's dense stage: the members' dense blocks and bottlenecks, grouped by width.

Widths 8-32 share a group, zero-padded to 32; 64 and 128 have their own. Block k of every
member of a group that is deeper than k is one batched product. The bottlenecks of a group take
inputs of different lengths (30 + d*w); they are zero-padded at the front to the deepest
member's length. Padded weights see only zero inputs (or feed zero weights), so their gradients,
Adam moments and updates are exactly zero: they stay zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msda.network import native
from msda.network.ops import BN_EPS, StackedBN, StackedLinear

def dense_columns(n_in: int, k: int, width: int, slot: int) -> torch.Tensor:
    """Where the inputs of a module's dense block k ([h_k .. h_1, base], blocks of ``width``)
    sit in the stacked layout, whose blocks are ``slot`` wide."""
    c = torch.arange(k * width)
    return torch.cat(((c // width) * slot + c % width, k * slot + torch.arange(n_in)))




class WidthGroup(nn.Module):
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
                        "linear1": StackedLinear(g, k_in, width),
                        "linear2": StackedLinear(g, width, width),
                        "linear3": StackedLinear(g, width, width),
                        "bn1": StackedBN((g, width)),
                        "bn2": StackedBN((g, width)),
                        "bn3": StackedBN((g, width)),
                    }
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.fc = StackedLinear(len(depths), self.max_in, bottleneck)
        self.fc_bn = StackedBN((len(depths), bottleneck))
        self.out = StackedLinear(len(depths), bottleneck, 1)

    @staticmethod
    def _lbr(x: torch.Tensor, lin: StackedLinear, bn: StackedBN) -> torch.Tensor:
        y = lin(x)  # (g, B, w)
        g, b, w = y.shape
        y = bn(y.transpose(0, 1).reshape(b, g * w)).view(b, g, w).transpose(0, 1)
        return F.relu(y)

    def forward(self, h: torch.Tensor, lib=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (g, B, n_in) normalised inputs of the group's members -> (outputs (g, B), features (g, B, 32)).

        With ``lib`` (training on CPU), the blocks run as one autograd function (``DenseBlocks``)
        with their batch norms and ReLUs in C."""
        if lib is not None and self.training and self.width % 16 == 0 and self.width <= native.MAX_DENSE_WIDTH:
            f = DenseBlocks.apply(h, self, lib, self.fc.weight, self.fc.bias, *self.block_parameters())
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


class DenseBlocks(torch.autograd.Function):
    """The dense blocks and the bottleneck's linear layer of a ``WidthGroup`` in training mode on
    CPU, forward and backward written out: h (g, B, n_in) -> the bottleneck's pre-activations
    (g, B, 32) (``fc(WidthGroup._blocks(h))``).

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
                inp, mean, var = native.bnrelu_forward(lib, y, gamma, beta, BN_EPS)
                layer.append((y, inp, mean, torch.rsqrt(var + BN_EPS)))
                stats.append((mean, var))
            x[a:, :, start - w : start] = inp
            saved.append(layer)
        bns = [blk[name] for blk in group.blocks for name in ("bn1", "bn2", "bn3")]
        StackedBN.track_many([(bn, slice(None), mean, var) for bn, (mean, var) in zip(bns, stats)], b)
        out = h.new_empty(g, b, fc_w.shape[1])
        for j0, j1, start in DenseBlocks._runs(group, n_in):
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
        for j0, j1, start in DenseBlocks._runs(ctx.group, n_in):
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
