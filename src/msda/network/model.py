"""DenseSM and the DenseSM-E ensemble (METHOD.md section 4).

Module and parameter names follow the authors' DWN module (``conv_block.conv1``, ``norm``,
``dense_layers.K.linear1``, ``fc_layers.0.linear1``, ``out``) so that their published state
dicts load as they are. Layer sizes come from the feature schema and the architecture
(``msda.network.ArchSpec``; the default is the paper's). These modules are the reference every
faster engine is tested against, and the engine for any architecture the others do not cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msda.errors import WeightsError
from msda.network.spec import DEFAULT_ARCH, ArchSpec
from msda.schema import DEFAULT_SCHEMA, FeatureSchema, whole_number

# the default architecture's sizes, for the engines written for it alone (stacked, fused, native)
CONV_FILTERS = DEFAULT_ARCH.conv_filters
POOL_WINDOWS = DEFAULT_ARCH.pools
KERNEL = DEFAULT_ARCH.kernel
DROPOUT = DEFAULT_ARCH.dropout
BOTTLENECK = DEFAULT_ARCH.bottleneck  # the "features" of the domain loss
DEFAULT_WIDTHS = (8, 16, 32, 64, 128)
DEFAULT_DEPTHS = (1, 2, 3, 4, 5)
MAX_DEPTH, MAX_WIDTH, MAX_MEMBERS = 16, 1024, 256  # refused before anything is allocated
MAX_PARAMETERS = 2**28  # of a whole ensemble (1 GiB of float32)


def pooled_length(length: int, arch: ArchSpec = DEFAULT_ARCH) -> int:
    """Series length after the poolings (floor, then ceil for the last): 46 -> 23 -> 11 -> 3."""
    return arch.pooled_length(length)


class ConvBlock(nn.Module):
    """Temporal feature extractor: per convolution i, Conv1d (replicate padding) -> BN -> ReLU ->
    Dropout -> AvgPool (the last rounding up); modules ``conv<i>``, ``bn<i>``, ``dp<i>``."""

    def __init__(self, n_series: int, arch: ArchSpec = DEFAULT_ARCH):
        super().__init__()
        chans = (n_series, *arch.conv_filters)
        self.pools = arch.pools
        for i in range(len(arch.conv_filters)):
            self.add_module(f"conv{i + 1}", nn.Conv1d(chans[i], chans[i + 1], arch.kernel, padding=arch.kernel // 2,
                                                      padding_mode="replicate"))
            self.add_module(f"bn{i + 1}", nn.BatchNorm1d(chans[i + 1]))
        for i in range(len(arch.conv_filters)):
            self.add_module(f"dp{i + 1}", nn.Dropout(arch.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.pools) - 1
        for i, window in enumerate(self.pools):
            conv, bn, dp = (getattr(self, f"{k}{i + 1}") for k in ("conv", "bn", "dp"))
            x = F.avg_pool1d(dp(F.relu(bn(conv(x)))), window, ceil_mode=i == last)
        return x.flatten(1)


class DenseBlock(nn.Module):
    """``layers`` Linear -> BN -> ReLU layers of width w (``linear<i>``, ``bn<i>``); the output is
    concatenated to the input."""

    def __init__(self, n_in: int, width: int, layers: int = DEFAULT_ARCH.block_layers):
        super().__init__()
        self.layers = layers
        for i in range(layers):
            self.add_module(f"linear{i + 1}", nn.Linear(n_in if i == 0 else width, width))
        for i in range(layers):
            self.add_module(f"bn{i + 1}", nn.BatchNorm1d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(self.layers):
            h = F.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"linear{i + 1}")(h)))
        return torch.cat((h, x), dim=1)


class Bottleneck(nn.Module):
    """Linear -> ReLU -> BN to the 32 features (the authors' ``SingleFcBlock``)."""

    def __init__(self, n_in: int, n_out: int = BOTTLENECK):
        super().__init__()
        self.linear1 = nn.Linear(n_in, n_out)
        self.bn1 = nn.BatchNorm1d(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(F.relu(self.linear1(x)))


class DenseSM(nn.Module):
    """One member: ``depth`` dense blocks of ``width`` on scalars, series means and conv features
    (scalars only for a schema without series).

    Input: normalised features in schema order, shape (batch, schema.n_features).
    """

    def __init__(self, depth: int, width: int, schema: FeatureSchema = DEFAULT_SCHEMA, arch: ArchSpec = DEFAULT_ARCH):
        super().__init__()
        MemberSpec(depth, width)  # checks the sizes
        self.depth, self.width, self.schema, self.arch = depth, width, schema, arch
        self.n_scalars, self.n_series, self.length = schema.n_scalars, schema.n_series, schema.series_length
        self.n_in = n_dense_inputs(schema, arch)
        # a schema of scalars only has no temporal branch (and no conv_block in its state dict)
        self.conv_block = ConvBlock(self.n_series, arch) if self.n_series else None
        self.norm = nn.BatchNorm1d(self.n_in)
        self.dense_layers = nn.Sequential(*[DenseBlock(self.n_in + k * width, width, arch.block_layers)
                                            for k in range(depth)])
        self.fc_layers = nn.Sequential(Bottleneck(self.n_in + depth * width, arch.bottleneck))
        self.out = nn.Linear(arch.bottleneck, 1)

    @property
    def name(self) -> str:
        return member_name(self.depth, self.width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck features (32 by default) used by the domain loss (METHOD.md section 4)."""
        scalars = x[:, : self.n_scalars]
        if self.conv_block is None:
            h = scalars
        else:
            series = x[:, self.n_scalars :].reshape(x.shape[0], self.n_series, self.length)
            h = torch.cat((scalars, series.mean(dim=2), self.conv_block(series)), dim=1)
        return self.fc_layers(self.dense_layers(self.norm(h)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(x)
        y = self.out(f).squeeze(1)
        return (y, f) if return_features else y


def n_dense_inputs(schema: FeatureSchema, arch: ArchSpec = DEFAULT_ARCH) -> int:
    """Inputs of the dense blocks: scalars, series means and the temporal features; refuses a
    series too short for the poolings."""
    if schema.n_series and arch.pooled_length(schema.series_length) < 1:
        raise WeightsError(f"series of length {schema.series_length} are too short for poolings {list(arch.pools)}")
    if not schema.n_series:
        return schema.n_scalars
    return schema.n_scalars + schema.n_series + arch.conv_features(schema.series_length)


def member_name(depth: int, width: int) -> str:
    return f"m_{depth}_{width}"


@dataclass(frozen=True)
class MemberSpec:
    """One member's size: ``depth`` dense blocks of ``width`` (whole numbers, within the caps)."""

    depth: int
    width: int

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "depth", whole_number(self.depth, "member depth", 1, MAX_DEPTH))
            object.__setattr__(self, "width", whole_number(self.width, "member width", 1, MAX_WIDTH))
        except ValueError as exc:
            raise WeightsError(str(exc)) from None

    @property
    def name(self) -> str:
        return member_name(self.depth, self.width)

    def parameters(self, n_in: int, arch: ArchSpec = DEFAULT_ARCH) -> int:
        """Trainable parameters of this member's dense part on ``n_in`` inputs to its dense blocks."""
        w, total, layers = self.width, 0, arch.block_layers
        for k in range(self.depth):
            # the linears, their biases and batch norms
            total += (n_in + k * w) * w + (layers - 1) * w * w + 3 * layers * w
        return total + (n_in + self.depth * w + 3) * arch.bottleneck + 1


def default_members(
    widths: Sequence[int] = DEFAULT_WIDTHS, depths: Sequence[int] = DEFAULT_DEPTHS
) -> list[MemberSpec]:
    """The paper's 25 members: w in {8..128} x d in {1..5}, ordered by depth then width."""
    return [MemberSpec(d, w) for d in depths for w in widths]


class DenseSME(nn.Module):
    """DenseSM-E: independent DenseSM members whose mean is the prediction."""

    def __init__(
        self,
        members: Sequence[MemberSpec] | None = None,
        schema: FeatureSchema = DEFAULT_SCHEMA,
        seed: int | None = None,
        arch: ArchSpec = DEFAULT_ARCH,
    ):
        super().__init__()
        specs = list(members) if members is not None else default_members()
        if not specs:
            raise WeightsError("DenseSM-E needs at least one member")
        if len(specs) > MAX_MEMBERS:
            raise WeightsError(f"DenseSM-E of {len(specs)} members; at most {MAX_MEMBERS}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise WeightsError(f"duplicated members in {names}")
        n_in = n_dense_inputs(schema, arch)
        size = sum(s.parameters(n_in, arch) for s in specs)
        if size > MAX_PARAMETERS:
            raise WeightsError(f"DenseSM-E of {size:,} parameters; at most {MAX_PARAMETERS:,} (members {names[:5]}...)")
        self.schema = schema
        self.specs = specs
        self.arch = arch
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.members = nn.ModuleList([DenseSM(s.depth, s.width, schema, arch) for s in specs])
        else:
            self.members = nn.ModuleList([DenseSM(s.depth, s.width, schema, arch) for s in specs])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's prediction, shape (batch, n_members)."""
        return torch.stack([m(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_outputs(x).mean(dim=1)
