"""All members of a DenseSM-E as stacked tensors, so that one step trains every member.

Training 25 members one after another (as the authors' code does) costs thousands of small
PyTorch calls per batch. Here the members share each batch and their parameters are stacked:

- the first convolution sees the same series in every member: one matrix product for all
  members, its batch norm folded into the weights (``conv_stage.SharedConv``), ReLU, dropout and the
  pairwise pool in one autograd function;
- the second convolution is one grouped convolution in steps-major layout, the third one
  banded matrix per member (``conv_stage.ToeplitzConv``); on CPU, C kernels (``native.py``) can replace the
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

import numpy as np
import torch
from torch import nn

from msda.errors import MsdaError
from msda.network import native
from msda.network.conv_stage import NativeConvStage, SharedConv, StackedConv, ToeplitzConv
from msda.network.dense_stage import WidthGroup, dense_columns
from msda.network.model import CONV_FILTERS, KERNEL, POOL_WINDOWS, DenseSM, DenseSME, MemberSpec
from msda.network.ops import RNG, StackedBN
from msda.network.spec import ArchSpec
from msda.schema import FeatureSchema

MERGE_WIDTH = 32  # members this narrow share one dense group (zero-padded to its widest)
CHUNK_BYTES = 30 * 1024 * 1024  # under glibc's largest mmap threshold (32 MiB)


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
        self.conv1 = SharedConv(m, self.n_series, CONV_FILTERS[0], POOL_WINDOWS[0])
        self.conv2 = StackedConv(m, CONV_FILTERS[0], CONV_FILTERS[1], POOL_WINDOWS[1])
        self.conv3 = ToeplitzConv(m, CONV_FILTERS[1], CONV_FILTERS[2], POOL_WINDOWS[2])
        self.norm = StackedBN((m, self.n_in))
        self.group_sizes = []
        groups = []
        for key in keys:
            members = [specs[i] for i in self.order if group_of(specs[i]) == key]
            slot = max(s.width for s in members)
            groups.append(WidthGroup(slot, [s.depth for s in members], [s.width for s in members], self.n_in, 32))
            self.group_sizes.append(len(members))
        self.groups = nn.ModuleList(groups)
        self.dropout = True  # tests switch it off to compare with the modules deterministically
        # the C training kernels on CPU (native.py: the three convolutions and their batch norms,
        # the dense layers' batch norms): None where they build, True insists, False never
        self.native: bool | None = None

    # ----- computation -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, internal_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Members in ``specs`` order, or in ``self.order`` (grouped by width) if ``internal_order``."""
        before = getattr(RNG, "generator", None)
        RNG.generator = self.generator
        try:
            return self._forward(x, internal_order)
        finally:
            RNG.generator = before

    def _forward(self, x: torch.Tensor, internal_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        training = self.training and self.dropout
        b = x.shape[0]
        m = len(self.specs)
        scalars = x[:, : self.n_scalars]
        series = x[:, self.n_scalars :].reshape(b, self.n_series, self.length)
        patches, stats = SharedConv.patches(series, self.training)
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
                            f"model on CPU, series of 2-{native.MAX_LENGTH} steps and a C compiler (see msda/network/native.py)")
        return lib

    def _conv_stage(self, patches: torch.Tensor, stats, training: bool, part: slice, lib=None) -> torch.Tensor:
        """Temporal features of the members in ``part``: (B, k, 4 * L3), channel-major per member;
        with ``lib``, in C (training mode: the batch norms use batch statistics)."""
        if lib is not None:
            c2, c3 = self.conv2, self.conv3
            y, y_stats = NativeConvStage.apply(patches, self.conv1.fused(stats, part), c2.weight[part], c2.bias[part],
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

        def bn(stacked: StackedBN, index, mod: nn.BatchNorm1d) -> None:
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
                dense(blk["linear1"].weight, slot, w, dense_columns(self.n_in, k, w, s), layer.linear1.weight)
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
            dense(group.fc.weight, j, fc.linear1.weight.shape[0], offset + dense_columns(self.n_in, depth, w, s), fc.linear1.weight)
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
    def covers(arch: ArchSpec, mode: str, n_series: int = 1) -> bool:
        """Training of the default spec with series (its convolution stage, fair-coin dropout and
        C kernels are written for it)."""
        return mode == "train" and arch.is_default and n_series > 0

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
