"""DenseSM and the DenseSM-E ensemble (METHOD.md section 4).

Module and parameter names follow the authors' DWN module (``conv_block.conv1``, ``norm``,
``dense_layers.K.linear1``, ``fc_layers.0.linear1``, ``out``) so that their published state
dicts load as they are. Layer sizes come from the feature schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msda.errors import WeightsError
from msda.schema import DEFAULT_SCHEMA, FeatureSchema, whole_number

CONV_FILTERS = (32, 16, 4)
POOL_WINDOWS = (2, 2, 4)
KERNEL = 5
DROPOUT = 0.5
BOTTLENECK = 32  # the "features" of the domain loss
DEFAULT_WIDTHS = (8, 16, 32, 64, 128)
DEFAULT_DEPTHS = (1, 2, 3, 4, 5)
MAX_DEPTH, MAX_WIDTH, MAX_MEMBERS = 16, 1024, 256  # refused before anything is allocated
MAX_PARAMETERS = 2**28  # of a whole ensemble (1 GiB of float32)


def pooled_length(length: int) -> int:
    """Series length after the three poolings (floor, floor, ceil): 46 -> 23 -> 11 -> 3."""
    n = length // POOL_WINDOWS[0]
    n = n // POOL_WINDOWS[1]
    return -(-n // POOL_WINDOWS[2])


class ConvBlock(nn.Module):
    """Temporal feature extractor: 3 x (Conv1d k5 replicate -> BN -> ReLU -> Dropout -> AvgPool)."""

    def __init__(self, n_series: int):
        super().__init__()
        chans = (n_series, *CONV_FILTERS)
        pad = KERNEL // 2
        self.conv1 = nn.Conv1d(chans[0], chans[1], KERNEL, padding=pad, padding_mode="replicate")
        self.bn1 = nn.BatchNorm1d(chans[1])
        self.conv2 = nn.Conv1d(chans[1], chans[2], KERNEL, padding=pad, padding_mode="replicate")
        self.bn2 = nn.BatchNorm1d(chans[2])
        self.conv3 = nn.Conv1d(chans[2], chans[3], KERNEL, padding=pad, padding_mode="replicate")
        self.bn3 = nn.BatchNorm1d(chans[3])
        self.dp1, self.dp2, self.dp3 = nn.Dropout(DROPOUT), nn.Dropout(DROPOUT), nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool1d(self.dp1(F.relu(self.bn1(self.conv1(x)))), POOL_WINDOWS[0])
        x = F.avg_pool1d(self.dp2(F.relu(self.bn2(self.conv2(x)))), POOL_WINDOWS[1])
        x = F.avg_pool1d(self.dp3(F.relu(self.bn3(self.conv3(x)))), POOL_WINDOWS[2], ceil_mode=True)
        return x.flatten(1)


class DenseBlock(nn.Module):
    """Three Linear -> BN -> ReLU layers of width w; the output is concatenated to the input."""

    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.linear1 = nn.Linear(n_in, width)
        self.linear2 = nn.Linear(width, width)
        self.linear3 = nn.Linear(width, width)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(width), nn.BatchNorm1d(width), nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.linear1(x)))
        h = F.relu(self.bn2(self.linear2(h)))
        h = F.relu(self.bn3(self.linear3(h)))
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
    """One member: ``depth`` dense blocks of ``width`` on scalars, series means and conv features.

    Input: normalised features in schema order, shape (batch, schema.n_features).
    """

    def __init__(self, depth: int, width: int, schema: FeatureSchema = DEFAULT_SCHEMA):
        super().__init__()
        MemberSpec(depth, width)  # checks the sizes
        self.depth, self.width, self.schema = depth, width, schema
        self.n_scalars, self.n_series, self.length = schema.n_scalars, schema.n_series, schema.series_length
        self.n_in = self.n_scalars + self.n_series + CONV_FILTERS[-1] * pooled_length(self.length)
        self.conv_block = ConvBlock(self.n_series)
        self.norm = nn.BatchNorm1d(self.n_in)
        self.dense_layers = nn.Sequential(*[DenseBlock(self.n_in + k * width, width) for k in range(depth)])
        self.fc_layers = nn.Sequential(Bottleneck(self.n_in + depth * width))
        self.out = nn.Linear(BOTTLENECK, 1)

    @property
    def name(self) -> str:
        return member_name(self.depth, self.width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 32 bottleneck features used by the domain loss (METHOD.md section 4)."""
        scalars = x[:, : self.n_scalars]
        series = x[:, self.n_scalars :].reshape(x.shape[0], self.n_series, self.length)
        h = torch.cat((scalars, series.mean(dim=2), self.conv_block(series)), dim=1)
        return self.fc_layers(self.dense_layers(self.norm(h)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(x)
        y = self.out(f).squeeze(1)
        return (y, f) if return_features else y


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

    def parameters(self, n_in: int) -> int:
        """Trainable parameters of this member on ``n_in`` inputs to its dense blocks."""
        w, total = self.width, 0
        for k in range(self.depth):
            total += (n_in + k * w) * w + 2 * w * w + 9 * w  # three linears, their biases and batch norms
        return total + (n_in + self.depth * w + 3) * BOTTLENECK + 1


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
        n_in = schema.n_scalars + schema.n_series + CONV_FILTERS[-1] * pooled_length(max(schema.series_length, 1))
        size = sum(s.parameters(n_in) for s in specs)
        if size > MAX_PARAMETERS:
            raise WeightsError(f"DenseSM-E of {size:,} parameters; at most {MAX_PARAMETERS:,} (members {names[:5]}...)")
        self.schema = schema
        self.specs = specs
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.members = nn.ModuleList([DenseSM(s.depth, s.width, schema) for s in specs])
        else:
            self.members = nn.ModuleList([DenseSM(s.depth, s.width, schema) for s in specs])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's prediction, shape (batch, n_members)."""
        return torch.stack([m(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_outputs(x).mean(dim=1)
