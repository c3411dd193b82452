"""The feature schema: names, units, raw ranges, encodings and order of every model input.

The default is Table 1 of the paper (METHOD.md section 3): 15 scalars, then three 46-step
8-day series (NDVI, 2 m air temperature, precipitation), 153 columns in the authors' order.
Each column is min-max normalised with its raw range and clipped to [0, 1].
A user schema (TOML or YAML) may drop, add or resize inputs; DenseSM sizes itself from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from msda.errors import SchemaError
from msda.io import atomic_write_text

EncodingFunc = Literal["sin", "cos", "ratio"]
MAX_INPUTS = 1024  # scalars + series a schema may declare
MAX_SERIES_LENGTH = 4096  # steps of one series


def whole_number(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; ValueError naming ``what`` for 2.5, "3", True or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if not float(value).is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {int(value)}")
    return int(value)


def _entries(d: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    items = d.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise SchemaError(f"{source}: {key!r} must be a list of tables (one per input)")
    return items


TRUTH_MAX = 0.6  # m3/m3: the default upper bound of soil moisture (predictions are clipped to it)


@dataclass(frozen=True)
class Encoding:
    """How a feature is computed from a raw source column.

    ``sin``/``cos``: ``f(2*pi*source/period)``; ``ratio``: ``source/period``.
    """

    source: str
    func: EncodingFunc
    period: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.func == "ratio":
            return values / self.period
        angle = 2.0 * math.pi * values / self.period
        return np.sin(angle) if self.func == "sin" else np.cos(angle)


@dataclass(frozen=True)
class Scalar:
    """One scalar input: its raw range [lo, hi] in ``units`` maps to [0, 1]."""

    name: str
    units: str
    lo: float
    hi: float
    description: str = ""
    encoding: Encoding | None = None


@dataclass(frozen=True)
class Series:
    """A time series input of ``length`` steps of ``step_days`` days before the acquisition."""

    name: str
    units: str
    lo: float
    hi: float
    length: int = 46
    step_days: int = 8
    description: str = ""

    def column_names(self) -> list[str]:
        width = max(2, len(str(self.length - 1)))
        return [f"{self.name}_{i:0{width}d}" for i in range(self.length)]


@dataclass(frozen=True)
class FeatureSchema:
    """The ordered model inputs: scalars first, then the series, each flattened in time order."""

    name: str
    scalars: tuple[Scalar, ...]
    series: tuple[Series, ...]
    description: str = ""
    truth_max: float = TRUTH_MAX  # m3/m3: predictions are clipped to [0, truth_max] unless asked not to
    _lo: np.ndarray = field(init=False, repr=False, compare=False)
    _hi: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.scalars] + [s.name for s in self.series]
        if not self.scalars and not self.series:
            raise SchemaError(f"schema {self.name!r} declares no inputs")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"schema {self.name!r}: duplicated input names {dupes}")
        for item in (*self.scalars, *self.series):
            if not (math.isfinite(item.lo) and math.isfinite(item.hi)) or item.hi <= item.lo:
                raise SchemaError(
                    f"schema {self.name!r}: input {item.name!r} needs a finite range with "
                    f"lo < hi, got [{item.lo}, {item.hi}]"
                )
        if not (math.isfinite(self.truth_max) and self.truth_max > 0):
            raise SchemaError(f"schema {self.name!r}: truth_max must be a positive number, got {self.truth_max}")
        lengths = {s.length for s in self.series}
        if len(lengths) > 1:
            raise SchemaError(
                f"schema {self.name!r}: all series must have one length for the temporal "
                f"convolution, got {sorted(lengths)}"
            )
        if self.series and min(lengths) < 4:
            raise SchemaError(f"schema {self.name!r}: series need at least 4 steps, got {min(lengths)}")
        if not self.series and not self.scalars:
            raise SchemaError(f"schema {self.name!r}: no inputs; give scalars, series or both")
        lo = [s.lo for s in self.scalars] + [s.lo for s in self.series for _ in range(s.length)]
        hi = [s.hi for s in self.scalars] + [s.hi for s in self.series for _ in range(s.length)]
        object.__setattr__(self, "_lo", np.asarray(lo, dtype=np.float64))
        object.__setattr__(self, "_hi", np.asarray(hi, dtype=np.float64))

    # ----- layout -------------------------------------------------------------------------
    @property
    def n_scalars(self) -> int:
        return len(self.scalars)

    @property
    def n_series(self) -> int:
        return len(self.series)

    @property
    def series_length(self) -> int:
        """Steps of every series (0 for a schema of scalars only)."""
        return self.series[0].length if self.series else 0

    @property
    def n_features(self) -> int:
        """Number of table columns (153 for Table 1)."""
        return self.n_scalars + self.n_series * self.series_length

    @property
    def feature_names(self) -> list[str]:
        """Our column names, in model order (``vv``, ..., ``ndvi_00``, ..., ``tp_45``)."""
        names = [s.name for s in self.scalars]
        for s in self.series:
            names += s.column_names()
        return names

    @property
    def authors_columns(self) -> list[str]:
        """The authors' CSV column names, ``"0"`` .. ``str(n_features - 1)``."""
        return [str(i) for i in range(self.n_features)]

    @property
    def lo(self) -> np.ndarray:
        return self._lo.copy()

    @property
    def hi(self) -> np.ndarray:
        return self._hi.copy()

    # ----- conversions --------------------------------------------------------------------
    def encode(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Raw physical columns -> feature values in raw units (encodings applied).

        A feature column given directly is used as it is; an encoded feature missing from
        ``raw`` is computed from its source column (e.g. ``doy_sin`` from ``doy``).
        """
        out: dict[str, np.ndarray] = {}
        for s in self.scalars:
            if s.name in raw.columns:
                out[s.name] = raw[s.name].to_numpy(dtype=np.float64)
            elif s.encoding is not None and s.encoding.source in raw.columns:
                out[s.name] = s.encoding.apply(raw[s.encoding.source].to_numpy(dtype=np.float64))
            else:
                hint = f" or its source {s.encoding.source!r}" if s.encoding else ""
                raise SchemaError(f"raw inputs lack column {s.name!r}{hint} (schema {self.name!r})")
        for s in self.series:
            cols = s.column_names()
            missing = [c for c in cols if c not in raw.columns]
            if missing:
                raise SchemaError(
                    f"raw inputs lack {len(missing)} columns of series {s.name!r}, first {missing[0]!r}"
                )
            for c in cols:
                out[c] = raw[c].to_numpy(dtype=np.float64)
        return pd.DataFrame(out, index=raw.index)

    def normalise(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Feature values in raw units -> model inputs, ``(x - lo) / (hi - lo)`` clipped to [0, 1].

        NaN stays NaN so that the table validator can report it.
        """
        x = self._as_matrix(features)
        z = (x - self._lo) / (self._hi - self._lo)
        return np.clip(z, 0.0, 1.0).astype(np.float32)

    def denormalise(self, normalised: np.ndarray | pd.DataFrame) -> pd.DataFrame:
        """Model inputs in [0, 1] -> feature values in raw units (inverse of ``normalise``)."""
        z = self._as_matrix(normalised)
        x = self._lo + z * (self._hi - self._lo)
        return pd.DataFrame(x, columns=self.feature_names)

    def denormalise_column(self, name: str, normalised: np.ndarray | pd.Series) -> np.ndarray:
        """One feature column from [0, 1] back to raw units (``denormalise`` for a single column)."""
        if name not in self.feature_names:
            raise SchemaError(f"schema {self.name!r} has no feature {name!r}")
        i = self.feature_names.index(name)
        return self._lo[i] + np.asarray(normalised, dtype=np.float64) * (self._hi[i] - self._lo[i])

    def decode(self, features: pd.DataFrame) -> pd.DataFrame:
        """Recover raw source columns (``doy``, ``aspect_deg``, ...) from their encodings.

        A sin/cos pair gives the angle through atan2; a ratio is multiplied back.
        """
        out: dict[str, np.ndarray] = {}
        by_source: dict[str, dict[str, Scalar]] = {}
        for s in self.scalars:
            if s.encoding is not None:
                by_source.setdefault(s.encoding.source, {})[s.encoding.func] = s
        for source, funcs in by_source.items():
            if "ratio" in funcs:
                enc = funcs["ratio"].encoding
                out[source] = features[funcs["ratio"].name].to_numpy(dtype=np.float64) * enc.period
            elif "sin" in funcs and "cos" in funcs:
                period = funcs["sin"].encoding.period
                angle = np.arctan2(
                    features[funcs["sin"].name].to_numpy(dtype=np.float64),
                    features[funcs["cos"].name].to_numpy(dtype=np.float64),
                )
                out[source] = np.mod(angle / (2 * math.pi) * period, period)
        return pd.DataFrame(out, index=features.index)

    def _as_matrix(self, values: pd.DataFrame | np.ndarray) -> np.ndarray:
        if isinstance(values, pd.DataFrame):
            missing = [c for c in self.feature_names if c not in values.columns]
            if missing:
                raise SchemaError(f"schema {self.name!r}: missing feature column {missing[0]!r}")
            return values[self.feature_names].to_numpy(dtype=np.float64)
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise SchemaError(
                f"schema {self.name!r} has {self.n_features} features, got an array of shape {x.shape}"
            )
        return x

    # ----- identity and files -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def scalar(s: Scalar) -> dict[str, Any]:
            d = {k: v for k, v in asdict(s).items() if k != "encoding"}
            if s.encoding is not None:
                d["encoding"] = asdict(s.encoding)
            return d

        d = {
            "name": self.name,
            "description": self.description,
            "scalars": [scalar(s) for s in self.scalars],
            "series": [asdict(s) for s in self.series],
        }
        if self.truth_max != TRUTH_MAX:
            d["truth_max"] = self.truth_max
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "FeatureSchema":
        if not isinstance(d, dict):
            raise SchemaError(f"{source}: a schema must be a mapping, got {type(d).__name__}")
        if len(_entries(d, "scalars", source)) + len(_entries(d, "series", source)) > MAX_INPUTS:
            raise SchemaError(f"{source}: more than {MAX_INPUTS} inputs")
        try:
            scalars = []
            for s in _entries(d, "scalars", source):
                s = dict(s)
                enc = s.pop("encoding", None)
                scalars.append(
                    Scalar(
                        name=str(s.pop("name")),
                        units=str(s.pop("units", "")),
                        lo=float(s.pop("lo")),
                        hi=float(s.pop("hi")),
                        description=str(s.pop("description", "")),
                        encoding=None if enc is None else _encoding(enc),
                    )
                )
                if s:
                    raise SchemaError(f"{source}: scalar {scalars[-1].name!r} has unknown keys {sorted(s)}")
            series = []
            for s in _entries(d, "series", source):
                s = dict(s)
                name = str(s.pop("name"))
                series.append(
                    Series(
                        name=name,
                        units=str(s.pop("units", "")),
                        lo=float(s.pop("lo")),
                        hi=float(s.pop("hi")),
                        length=whole_number(s.pop("length", 46), f"series {name!r} length", 1, MAX_SERIES_LENGTH),
                        step_days=whole_number(s.pop("step_days", 8), f"series {name!r} step_days", 1, 3660),
                        description=str(s.pop("description", "")),
                    )
                )
                if s:
                    raise SchemaError(f"{source}: series {series[-1].name!r} has unknown keys {sorted(s)}")
            unknown = set(d) - {"name", "description", "scalars", "series", "truth_max"}
            if unknown:
                raise SchemaError(f"{source}: unknown top-level keys {sorted(unknown)}")
            return cls(
                name=str(d.get("name", "custom")),
                scalars=tuple(scalars),
                series=tuple(series),
                description=str(d.get("description", "")),
                truth_max=float(d.get("truth_max", TRUTH_MAX)),
            )
        except KeyError as exc:
            raise SchemaError(f"{source}: an input lacks the required key {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(f"{source}: {exc}") from None

    def fingerprint(self) -> str:
        """A short hash of names, order, ranges and encodings (not descriptions)."""
        d = self.to_dict()
        d.pop("description")
        d.pop("name")
        for item in d["scalars"] + d["series"]:
            item.pop("description")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def same_layout(self, other: "FeatureSchema") -> bool:
        return self.fingerprint() == other.fingerprint()

    @property
    def is_default(self) -> bool:
        """True when this schema is the paper's Table 1 (the only one the authors' weights fit)."""
        return self.same_layout(table1())

    def save(self, path: str | Path, force: bool = False) -> None:
        """Write the schema in the format its extension names (``.toml``, ``.yaml``/``.yml``,
        ``.json``), the formats :func:`load_schema` reads; replaces only a schema msda wrote."""
        import tomli_w

        path = Path(path)
        d = self.to_dict()
        suffix = path.suffix.lower()
        if suffix == ".toml":
            text = tomli_w.dumps(d)
        elif suffix == ".json":
            text = json.dumps(d, indent=2)
        elif suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(d, sort_keys=False)
        else:
            raise SchemaError(f"{path}: a schema file ends in .toml, .yaml, .yml or .json")
        atomic_write_text(path, text, "schema", force)


def _encoding(d: dict[str, Any]) -> Encoding:
    if not isinstance(d, dict):
        raise SchemaError(f"an encoding must be a table (source, func, period), got {d!r}")
    func = str(d["func"])
    if func not in ("sin", "cos", "ratio"):
        raise SchemaError(f"encoding func must be sin, cos or ratio, got {func!r}")
    period = float(d["period"])
    if not (period > 0 and math.isfinite(period)):
        raise SchemaError(f"encoding period must be > 0, got {period}")
    return Encoding(source=str(d["source"]), func=func, period=period)  # type: ignore[arg-type]


def load_schema(path: str | Path) -> FeatureSchema:
    """Read a schema from a TOML, YAML or JSON file (keys as ``FeatureSchema.to_dict``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read schema file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not a text file") from None
    try:
        if path.suffix == ".toml":
            d = tomllib.loads(text)
        elif path.suffix == ".json":
            d = json.loads(text)
        else:
            d = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SchemaError(f"{path}: not a valid schema file: {exc}") from None
    if not isinstance(d, dict):
        raise SchemaError(f"{path}: a schema file must hold a mapping at top level")
    return FeatureSchema.from_dict(d, source=str(path))


def table1() -> FeatureSchema:
    """The paper's Table 1: 15 scalars + NDVI, air temperature, precipitation x 46 (153 columns)."""
    doy, asp, col = "doy", "aspect_deg", "col_9km"
    return FeatureSchema(
        name="table1",
        description="Zhu et al. (2025) Table 1: Sentinel-1, soil, terrain, location, NDVI, ERA5-Land",
        scalars=(
            Scalar("vv", "dB", -30.0, 5.0, "Sentinel-1 VV backscatter"),
            Scalar("vh", "dB", -35.0, 0.0, "Sentinel-1 VH backscatter"),
            Scalar("angle", "deg", 29.1, 46.0, "Sentinel-1 incidence angle"),
            Scalar("doy_sin", "1", -1.0, 1.0, "sin(2 pi DoY/365) of the acquisition", Encoding(doy, "sin", 365.0)),
            Scalar("doy_cos", "1", -1.0, 1.0, "cos(2 pi DoY/365) of the acquisition", Encoding(doy, "cos", 365.0)),
            Scalar("sand", "g/kg", 0.0, 1000.0, "SoilGrids sand 0-5 cm"),
            Scalar("clay", "g/kg", 0.0, 1000.0, "SoilGrids clay 0-5 cm"),
            Scalar("bulk_density", "cg/cm3", 100.0, 180.0, "SoilGrids bulk density 0-5 cm"),
            Scalar("elevation", "m", 0.0, 5500.0, "SRTM elevation"),
            Scalar("slope", "deg", 0.0, 40.0, "SRTM slope"),
            Scalar("aspect_sin", "1", -1.0, 1.0, "sin of SRTM aspect", Encoding(asp, "sin", 360.0)),
            Scalar("aspect_cos", "1", -1.0, 1.0, "cos of SRTM aspect", Encoding(asp, "cos", 360.0)),
            Scalar("row", "1", 0.0, 1.0, "9 km EASE-2 row / 1624", Encoding("row_9km", "ratio", 1624.0)),
            Scalar("col_sin", "1", -1.0, 1.0, "sin(2 pi col/3856), 9 km EASE-2 column", Encoding(col, "sin", 3856.0)),
            Scalar("col_cos", "1", -1.0, 1.0, "cos(2 pi col/3856), 9 km EASE-2 column", Encoding(col, "cos", 3856.0)),
        ),
        series=(
            Series("ndvi", "1", -0.2, 1.0, 46, 8, "MODIS NDVI (MOD13Q1+MYD13Q1), year before acquisition"),
            Series("t2m", "degC", -10.0, 35.0, 46, 8, "ERA5-Land 2 m air temperature, 8-day means"),
            Series("tp", "m/d", 0.0, 0.3, 46, 8, "ERA5-Land daily precipitation, 8-day means"),
        ),
    )


DEFAULT_SCHEMA = table1()
