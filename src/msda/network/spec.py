"""``ArchSpec``: the DenseSM architecture as data (METHOD.md section 4), stored in the weights.

Sizes that come from the inputs (scalar and series counts, series length) come from the feature
schema; everything else is here. The default is the paper's network and the layout of the
authors' ``.pt`` files: three convolutions of 32, 16 and 4 filters, kernel 5, average pooling
by 2, 2 and 4 (the last rounding up), dropout 0.5, dense blocks of three layers and a
32-feature bottleneck. Each member adds its own depth and width (``MemberSpec``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from msda.errors import WeightsError

LIMITS = {"filters": (1, 1024), "kernel": (1, 31), "pool": (1, 16), "block_layers": (1, 8), "bottleneck": (1, 1024),
          "conv_layers": (1, 8)}


@dataclass(frozen=True)
class ArchSpec:
    """The network's architecture apart from the inputs and the members' depth and width."""

    conv_filters: tuple[int, ...] = (32, 16, 4)  # filters of each temporal convolution
    kernel: int = 5  # odd: replicate padding keeps the length
    pools: tuple[int, ...] = (2, 2, 4)  # average-pooling window after each convolution (the last rounds up)
    dropout: float = 0.5
    block_layers: int = 3  # Linear -> BN -> ReLU layers per dense block
    bottleneck: int = 32  # the features of the domain loss

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_filters", tuple(self.conv_filters))
        object.__setattr__(self, "pools", tuple(self.pools))
        lo, hi = LIMITS["conv_layers"]
        if not lo <= len(self.conv_filters) <= hi:
            raise WeightsError(f"conv_filters: {lo} to {hi} convolutions, got {len(self.conv_filters)}")
        if len(self.pools) != len(self.conv_filters):
            raise WeightsError(f"pools: one window per convolution ({len(self.conv_filters)}), got {len(self.pools)}")
        for name, values, key in (("conv_filters", self.conv_filters, "filters"), ("pools", self.pools, "pool"),
                                  ("kernel", (self.kernel,), "kernel"), ("block_layers", (self.block_layers,), "block_layers"),
                                  ("bottleneck", (self.bottleneck,), "bottleneck")):
            lo, hi = LIMITS[key]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise WeightsError(f"{name}: whole numbers from {lo} to {hi}, got {v!r}")
        if self.kernel % 2 == 0:
            raise WeightsError(f"kernel: an odd number (the padding keeps the series length), got {self.kernel}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise WeightsError(f"dropout: a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_ARCH

    def pooled_length(self, length: int) -> int:
        """Series length after the poolings (floor for all but the last, which rounds up)."""
        n = length
        for p in self.pools[:-1]:
            n //= p
        return -(-n // self.pools[-1])

    def conv_features(self, length: int) -> int:
        """Temporal features per sample: last filters x pooled length."""
        return self.conv_filters[-1] * self.pooled_length(length)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ArchSpec":
        if not isinstance(d, dict):
            raise WeightsError(f"{source}: the architecture is a table of keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WeightsError(f"{source}: unknown architecture key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except WeightsError as exc:
            raise WeightsError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise WeightsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        """An architecture from a .toml, .json or .yaml file (keys as the fields; an ``[arch]``
        table is also accepted)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise WeightsError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise WeightsError(f"{path}: an architecture file is .toml, .json, .yaml or .yml")
        except WeightsError:
            raise
        except Exception as exc:  # the parsers' own errors: one line naming the file
            raise WeightsError(f"{path}: not a valid {path.suffix[1:]} file ({exc})") from None
        if isinstance(data, dict) and set(data) == {"arch"}:
            data = data["arch"]
        return cls.from_dict(data, source=str(path))

    def describe(self) -> str:
        convs = ", ".join(f"{f} filters / pool {p}" for f, p in zip(self.conv_filters, self.pools))
        return (f"convolutions (kernel {self.kernel}, dropout {self.dropout:g}): {convs}; dense blocks of "
                f"{self.block_layers} layers; bottleneck {self.bottleneck}")


DEFAULT_ARCH = ArchSpec()
