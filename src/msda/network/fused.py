"""``FusedEnsemble``: inference-only DenseSM-E with every BatchNorm folded into the layer before or
after it. On CPU the convolution stage of all members runs in C, per sample and in cache
(``native``); elsewhere, or without a C compiler, as three grouped convolutions. It computes the
same function as ``DenseSME.eval()`` (tested to float32 rounding) with far fewer, larger
operations. It covers the default ``ArchSpec`` (three convolutions pooled by 2, 2 and 4). Whether
the C stage or PyTorch's is the faster depends on the CPU (``engines.prefer_native``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msda.errors import MsdaError
from msda.network import native
from msda.network.model import CONV_FILTERS, KERNEL, POOL_WINDOWS, DenseSM, DenseSME, pooled_length
from msda.network.ops import pair_sum
from msda.network.spec import ArchSpec

assert POOL_WINDOWS[:2] == (2, 2), "the fused convolutions pool pairs (their 1/2 is folded into the weights)"


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_after(layer: nn.Linear | nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(layer(x))`` as one layer."""
    scale, shift = _bn_affine(bn)
    w = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    return w, layer.bias * scale + shift


class _FusedMember(nn.Module):
    """The dense part of one member after the convolutions, BatchNorms folded."""

    def __init__(self, m: DenseSM):
        super().__init__()
        self.norm_scale, self.norm_shift = (t.detach().clone() for t in _bn_affine(m.norm))
        self.blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for blk in m.dense_layers:
            self.blocks.append(
                [
                    tuple(t.detach().t().contiguous() if t.dim() == 2 else t.detach().clone() for t in _fold_after(lin, bn))
                    for lin, bn in ((blk.linear1, blk.bn1), (blk.linear2, blk.bn2), (blk.linear3, blk.bn3))
                ]
            )
        fc = m.fc_layers[0]
        self.fc_w = fc.linear1.weight.detach().t().contiguous()
        self.fc_b = fc.linear1.bias.detach().clone()
        # out(bn(relu(z))) = (w_out * scale) . relu(z) + (w_out . shift + b_out)
        scale, shift = _bn_affine(fc.bn1)
        self.feat_scale, self.feat_shift = scale.detach().clone(), shift.detach().clone()
        self.out_w = (m.out.weight[0] * scale).detach().reshape(-1, 1).contiguous()
        self.out_b = (m.out.weight[0] @ shift + m.out.bias[0]).detach().reshape(1)

    def to_device(self, device: torch.device) -> "_FusedMember":
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        self.blocks = [[(w.to(device), b.to(device)) for w, b in blk] for blk in self.blocks]
        return self

    def forward(self, h0: torch.Tensor, features: bool = False):
        """The member's output (B,), and with ``features`` also its bottleneck features (B, 32)."""
        x = torch.addcmul(self.norm_shift, h0, self.norm_scale)
        for (w1, b1), (w2, b2), (w3, b3) in self.blocks:
            h = torch.addmm(b1, x, w1).relu_()
            h = torch.addmm(b2, h, w2).relu_()
            h = torch.addmm(b3, h, w3).relu_()
            x = torch.cat((h, x), dim=1)
        z = torch.addmm(self.fc_b, x, self.fc_w).relu_()
        out = torch.addmm(self.out_b, z, self.out_w).squeeze(1)
        return (out, torch.addcmul(self.feat_shift, z, self.feat_scale)) if features else out


def _replicate_pad(x: torch.Tensor, dim: int, pad: int = KERNEL // 2) -> torch.Tensor:
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat((*[first] * pad, x, *[last] * pad), dim=dim)


def _grouped_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """relu(conv1d) of every member, (batch, steps, members * c_in) -> (batch, steps, members * c_out).

    One grouped convolution (oneDNN on CPU) on steps-major ("channels-last") tensors: the
    replicate-padded input is read in place and the output comes back steps-major, no copies.
    """
    x4 = _replicate_pad(h, 1).transpose(1, 2).unsqueeze(2)  # (B, C, 1, L + 4), channels-last strides
    y = F.conv2d(x4, weight, bias, groups=groups)  # (B, C_out, 1, L), channels-last
    return y.squeeze(2).transpose(1, 2).relu_()


class FusedEnsemble:
    """Inference-only DenseSM-E: folded BatchNorms, all members' convolutions at once.

    On CPU the convolution stage runs in C (``native``, below). Otherwise, in PyTorch,
    convolutions run steps-major ("channels-last"): the first (shared input) as one GEMM over
    all members, the next two as grouped convolutions (one group per member). The factor 1/2 of
    the first two average poolings is folded into their weights (relu(z / 2) = relu(z) / 2, exact
    in floating point), so that pooling is one addition of two strided views. They run on
    sub-batches of ``conv_batch`` samples, small enough to stay in cache; the dense part runs
    on the whole batch.
    ``compile=True`` runs the PyTorch convolution stage through ``torch.compile`` (a one-off
    compilation of some seconds; needs a C++ compiler on CPU), for GPUs; on CPU the C stage is
    faster (README).
    ``native``: run the convolution stage in C (msda/network/native.py); None (default) does so on CPU
    when the kernel builds and covers the architecture and ``compile`` is off, True insists.
    """

    def __init__(
        self,
        ensemble: DenseSME,
        device: str | torch.device = "cpu",
        conv_batch: int | None = None,
        compile: bool = False,
        native: bool | None = None,
    ):
        self.device = torch.device(device)
        self.conv_batch = conv_batch or 64
        self._conv = torch.compile(self._conv_features, dynamic=False) if compile else self._conv_features
        self.compiled = compile
        self.names = ensemble.names
        members = list(ensemble.members)
        first = members[0]
        self.n_scalars, self.n_series, self.length = first.n_scalars, first.n_series, first.length
        m = self.n_members = len(members)
        with torch.no_grad():
            folded = []
            for i in (1, 2, 3):
                pairs = [_fold_after(getattr(mb.conv_block, f"conv{i}"), getattr(mb.conv_block, f"bn{i}")) for mb in members]
                folded.append((torch.cat([p[0] for p in pairs]).detach(), torch.cat([p[1] for p in pairs]).detach()))
            (w1, b1), (w2, b2), (w3, b3) = folded
            self.c1 = w1.shape[0] // m
            half = 0.5  # the first two poolings average pairs
            # conv1: (M*C1, S, K) -> (S*K + 1, M*C1), rows ordered (channel, tap) as unfold gives them
            # (bias as the last row)
            self.w1 = (torch.cat((w1.reshape(m * self.c1, -1).t(), b1[None]), 0) * half).contiguous().to(self.device)
            # conv2/3: (M*O, C, K) -> grouped Conv2d weights (M*O, C, 1, K), channels-last
            self.kernels, self.kernel_bias = [], []
            for w, b, scale in ((w2, b2, half), (w3, b3, 1.0)):
                self.kernels.append((w * scale).unsqueeze(2).contiguous(memory_format=torch.channels_last).to(self.device))
                self.kernel_bias.append((b * scale).to(self.device))
            self.dense = [_FusedMember(mb).to_device(self.device) for mb in members]
        self.native = self._native_stage(native, compile)

    @staticmethod
    def covers(arch: ArchSpec, mode: str, n_series: int = 1) -> bool:
        """Inference of the default spec with series (its stages are written for three
        convolutions, poolings of 2, 2 and 4 and dense blocks of three layers)."""
        return mode == "infer" and arch.is_default and n_series > 0

    def _native_stage(self, wanted: bool | None, compile: bool) -> native.ConvStage | None:
        if wanted is False or (wanted is None and (compile or self.device.type != "cpu")):
            return None
        fits = self.device.type == "cpu" and native.supports(
            self.n_series, self.length, (self.c1, *(k.shape[0] // self.n_members for k in self.kernels)), KERNEL,
            POOL_WINDOWS,
        )
        lib = native.conv_stage_library() if fits else None
        if lib is None:
            if wanted:
                raise MsdaError("the C convolution stage was asked for, but it needs a CPU device, the default "
                                "architecture and a C compiler (see msda/network/native.py)")
            return None
        return native.ConvStage(lib, self.w1, self.kernels, self.kernel_bias, self.n_members, self.n_series,
                                self.length, CONV_FILTERS[2] * pooled_length(self.length))

    def _conv_features(self, series: torch.Tensor) -> torch.Tensor:
        """Temporal features of every member: (batch, n_series, length) -> (batch, M, C3 * L3)."""
        b, m = series.shape[0], self.n_members
        # conv1, shared input: one GEMM for all members, then pool (the 1/2 is in the weights)
        windows = _replicate_pad(series.transpose(1, 2), 1).unfold(1, KERNEL, 1)  # (b, L, S, K)
        cols = series.new_ones(b * self.length, self.w1.shape[0])  # the last column multiplies the bias
        cols[:, :-1] = windows.reshape(b * self.length, -1)
        h = torch.mm(cols, self.w1).relu_()  # (addmm would first copy the bias into every row)
        h = pair_sum(h.view(b, self.length, m * self.c1), 1)
        h = pair_sum(_grouped_conv(h, self.kernels[0], self.kernel_bias[0], m), 1)  # conv2, pool
        h = _grouped_conv(h, self.kernels[1], self.kernel_bias[1], m)  # conv3: (b, L2, m*c3)
        w = POOL_WINDOWS[2]  # ceil-mode average pooling
        pooled = torch.stack([h[:, s : s + w].mean(1) for s in range(0, h.shape[1], w)], dim=2)  # (b, m*c3, L3)
        # channel-major per member, like Conv1d output flattening
        return pooled.reshape(b, m, -1)

    def _conv_chunk(self, series: torch.Tensor) -> torch.Tensor:
        n = series.shape[0]
        if self.compiled and n < self.conv_batch:  # one shape for the compiled graph
            series = torch.cat((series, series[-1:].expand(self.conv_batch - n, -1, -1)))
        return self._conv(series)[:n]

    @torch.inference_mode()
    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's prediction for normalised inputs x, shape (batch, n_members)."""
        if x.shape[0] == 0:
            return torch.empty(0, self.n_members, device=x.device, dtype=x.dtype)
        return self._dense_all(*self._shared_and_conv(x))

    @torch.inference_mode()
    def member_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's prediction (n_members, batch) and bottleneck features (n_members, batch, 32),
        the 32 values the domain losses compare (after the bottleneck's batch norm)."""
        shared, conv = self._shared_and_conv(x)
        outs = [member(torch.cat((shared, conv[:, j]), dim=1), features=True) for j, member in enumerate(self.dense)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def _shared_and_conv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scalars and series means (B, n_scalars + S) and every member's temporal features (B, M, 4 * L3)."""
        b = x.shape[0]
        scalars = x[:, : self.n_scalars]
        series = x[:, self.n_scalars :].reshape(b, self.n_series, self.length)
        if self.native is not None:
            conv = self.native(x, self.n_scalars)
        else:
            conv = torch.cat([self._conv_chunk(s) for s in series.split(self.conv_batch)])
        return torch.cat((scalars, series.mean(dim=2)), dim=1), conv

    def _dense_all(self, shared: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(torch.cat((shared, conv[:, j]), dim=1)) for j, member in enumerate(self.dense)], 1)
