"""Sample tables from raw tables: columns in the schema's physical units in, a validated,
normalised sample table out (``msda samples build``, ``msda.build_samples``).

What is derived when the schema needs it and the raw table lacks it:

- encoded inputs from their source (``doy_sin`` from ``doy``, ``aspect_sin`` from ``aspect_deg``);
- ``doy`` (day of year) from ``date``;
- the 9 km EASE-2 row and column (``r``, ``c``; ``row_9km``, ``col_9km`` for the location
  inputs) from ``lat`` and ``lon``, or from each other;
- ``network`` ("local") for a fine table without one.

Every other column (``lc``, site attributes, ...) is passed through. Values outside the
schema's raw range are clipped by the normalisation; each such column is reported in a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from msda.errors import TableError
from msda.grids import GRID_9KM, MAX_LAT
from msda.schema import FeatureSchema
from msda.tables import TRUTH, Kind, Samples, parse_dates, samples_from_frame

DEFAULT_NETWORK = "local"


def read_raw(path: str | Path) -> pd.DataFrame:
    """A raw table from .csv or .parquet; one TableError naming the file otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise TableError(f"{path}: cannot read the raw table ({exc})") from None
    raise TableError(f"{path}: a raw table is .csv or .parquet, got {path.suffix or 'no extension'!r}")


def _needed_sources(schema: FeatureSchema, columns) -> set[str]:
    """Raw columns the schema's encoded scalars would compute from (when not given directly)."""
    return {s.encoding.source for s in schema.scalars if s.encoding is not None and s.name not in columns}


def _location(frame: pd.DataFrame, needs: set[str], source: str) -> None:
    """Fill r, c (and row_9km, col_9km when needed) from lat / lon or from each other, in place."""
    has_rc = {"r", "c"} <= set(frame.columns)
    if not has_rc and {"row_9km", "col_9km"} <= set(frame.columns):
        frame["r"], frame["c"] = frame["row_9km"], frame["col_9km"]
        has_rc = True
    if not has_rc:
        if not {"lat", "lon"} <= set(frame.columns):
            raise TableError(f"{source}: no location; give lat and lon (degrees, WGS84) or the 9 km EASE-2 r and c")
        lat, lon = (pd.to_numeric(frame[k], errors="coerce").to_numpy(dtype=np.float64) for k in ("lat", "lon"))
        bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > MAX_LAT) | (np.abs(lon) > 180)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TableError(f"{source}: {int(bad.sum())} rows have no valid lat / lon inside the EASE-2 grid "
                             f"(|lat| <= {MAX_LAT:g}), e.g. row {i}: lat {frame['lat'].iloc[i]!r}, lon {frame['lon'].iloc[i]!r}")
        r, c = GRID_9KM.lonlat_to_rowcol(lon, lat)
        frame["r"], frame["c"] = np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64)
    for name, col in (("row_9km", "r"), ("col_9km", "c")):
        if name in needs and name not in frame.columns:
            frame[name] = pd.to_numeric(frame[col], errors="coerce").astype(np.float64)


def _report_clipping(features: pd.DataFrame, schema: FeatureSchema, source: str) -> None:
    lo, hi = schema.lo, schema.hi
    values = features[schema.feature_names].to_numpy(dtype=np.float64)
    outside = (values < lo - 1e-9) | (values > hi + 1e-9)
    cols = np.flatnonzero(outside.any(0))
    if len(cols):
        shown = ", ".join(f"{schema.feature_names[j]} ({int(outside[:, j].sum())} rows outside "
                          f"[{lo[j]:g}, {hi[j]:g}])" for j in cols[:5])
        more = f" and {len(cols) - 5} more columns" if len(cols) > 5 else ""
        warnings.warn(f"{source}: values outside the schema's raw range are clipped: {shown}{more}", stacklevel=3)


def build_samples(raw: pd.DataFrame, schema: FeatureSchema, kind: Kind, truth: str = TRUTH,
                  drop_nan: bool = False, source: str = "<frame>") -> Samples:
    """A sample table from a raw one (see the module's docstring for what is derived).

    ``truth``: the column of soil moisture in m3/m3 (in situ for ``kind`` "fine", SMAP for
    "coarse"). ``drop_nan``: drop rows with a missing feature (counted in ``Samples.dropped_nan``)
    instead of refusing the table.
    """
    if kind not in ("fine", "coarse"):
        raise TableError(f"kind is 'fine' (50 m, in-situ truth) or 'coarse' (9 km, SMAP truth), got {kind!r}")
    if raw.empty:
        raise TableError(f"{source}: the raw table has no rows")
    frame = raw.reset_index(drop=True).copy()
    if truth not in frame.columns:
        raise TableError(f"{source}: no truth column {truth!r} (soil moisture in m3/m3); name it with --truth")
    if truth != TRUTH:
        if TRUTH in frame.columns:
            raise TableError(f"{source}: both {truth!r} and {TRUTH!r}; which is the truth?")
        frame = frame.rename(columns={truth: TRUTH})
    values = pd.to_numeric(frame[TRUTH], errors="coerce")
    if values.max() > 1 and values.max() <= 100:
        raise TableError(f"{source}: truth column {truth!r} reaches {values.max():g}: soil moisture is in m3/m3 "
                         "(0-1); divide percent values by 100")
    if "date" not in frame.columns:
        raise TableError(f"{source}: no 'date' column (the acquisition date)")
    frame["date"] = parse_dates(frame["date"], source, frame.index)
    needs = _needed_sources(schema, frame.columns)
    if "doy" in needs and "doy" not in frame.columns:
        frame["doy"] = frame["date"].dt.day_of_year.astype(np.float64)
    _location(frame, needs, source)
    if kind == "fine":
        if "station" not in frame.columns:
            raise TableError(f"{source}: a fine table needs a 'station' column (the in-situ station of each row)")
        if "network" not in frame.columns:
            frame["network"] = DEFAULT_NETWORK
    try:
        features = schema.encode(frame)
    except Exception as exc:  # SchemaError naming the missing column: one line naming the file too
        raise TableError(f"{source}: {exc}") from None
    _report_clipping(features, schema, source)
    normalised = pd.DataFrame(schema.normalise(features), columns=schema.feature_names, index=frame.index)
    # the raw inputs become features; every other column is passed through
    inputs = ({sc.name for sc in schema.scalars} | {sc.encoding.source for sc in schema.scalars if sc.encoding}
              | {c for se in schema.series for c in se.column_names()})
    keep = [c for c in frame.columns if c not in inputs or c in ("r", "c", "date", "network", "station", TRUTH)]
    out = pd.concat([frame[keep], normalised], axis=1)
    return samples_from_frame(out, kind, schema, drop_nan=drop_nan, source=source)
