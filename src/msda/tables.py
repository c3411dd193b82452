"""Sample tables: the authors' CSV layout and our Parquet layout, read, validated and written.

Both hold one row per sample: the normalised model inputs (``FeatureSchema``), the truth in
m3/m3 and the sample's identity. The authors' CSV (METHOD.md section 3) names the features
``"0"``..``"152"``, the truth ``gt`` (fine, 50 m) or ``SMAP`` (coarse, 9 km) and the date
``edate`` (spreadsheet serial day, 1899-12-30 = 0). Our Parquet names the features after the
schema, the truth ``sm_m3m3`` and the date ``date``, and records kind and schema in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msda.errors import TableError
from msda.grids import GRID_9KM
from msda.io import atomic_path
from msda.schema import DEFAULT_SCHEMA, FeatureSchema

Kind = Literal["fine", "coarse"]
TRUTH = "sm_m3m3"
AUTHORS_TRUTH = {"fine": "gt", "coarse": "SMAP"}
EXCEL_EPOCH = pd.Timestamp("1899-12-30")
PARQUET_META_KEY = b"msda"
# identity columns, in the order we write them; anything else beside the features is kept as is
ID_COLUMNS = ("network", "station", "r", "c", "date", "lc")
REQUIRED_ID = {"fine": ("network", "station", "r", "c", "date"), "coarse": ("r", "c", "date")}
MAX_SHOWN = 5
FAR_OUTSIDE = 0.5  # a normalised feature below -0.5 or above 1.5 is taken for raw units


def edate_to_date(edate: Sequence[float] | np.ndarray | pd.Series) -> pd.DatetimeIndex:
    """Spreadsheet serial days (1899-12-30 = 0) -> dates (fractions of a day dropped)."""
    days = np.floor(np.asarray(edate, dtype=np.float64))
    return pd.DatetimeIndex(EXCEL_EPOCH + pd.to_timedelta(days, unit="D"))


def date_to_edate(dates: Sequence | pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Dates -> spreadsheet serial days (integers, 1899-12-30 = 0)."""
    d = pd.DatetimeIndex(pd.to_datetime(dates)).normalize()
    return np.asarray((d - EXCEL_EPOCH).days, dtype=np.int64)


@dataclass
class Samples:
    """A validated sample table. ``frame`` holds identity columns, ``sm_m3m3`` and the features."""

    frame: pd.DataFrame
    kind: Kind
    schema: FeatureSchema = DEFAULT_SCHEMA
    source: str = "<memory>"
    dropped_nan: int = 0

    def __len__(self) -> int:
        return len(self.frame)

    def features(self) -> np.ndarray:
        """The normalised model inputs, float32, shape (n, schema.n_features)."""
        return self.frame[self.schema.feature_names].to_numpy(dtype=np.float32)

    @property
    def truth(self) -> np.ndarray:
        return self.frame[TRUTH].to_numpy(dtype=np.float32)

    @property
    def networks(self) -> list[str]:
        if "network" not in self.frame:
            return []
        return sorted(self.frame["network"].dropna().astype(str).unique())

    def select_networks(self, networks: Sequence[str]) -> "Samples":
        """Rows of the given networks; an unknown name is an error that lists the known ones."""
        if "network" not in self.frame:
            raise TableError(f"{self.source}: no 'network' column to filter on")
        known = set(self.networks)
        unknown = [n for n in networks if n not in known]
        if unknown:
            raise TableError(
                f"{self.source}: unknown network(s) {unknown}; the table holds {sorted(known)}"
            )
        frame = self.frame[self.frame["network"].isin(list(networks))].reset_index(drop=True)
        return replace(self, frame=frame)


# ----- reading ------------------------------------------------------------------------------
def read_samples(
    path: str | Path,
    kind: Kind | None = None,
    schema: FeatureSchema | None = None,
    drop_nan: bool = False,
    networks: Sequence[str] | None = None,
) -> Samples:
    """Read and validate a sample table (``.csv`` authors' layout or ``.parquet`` ours).

    ``kind`` is inferred when omitted: ``gt`` -> fine, ``SMAP`` -> coarse (CSV), or from the
    Parquet metadata. ``schema`` None: the schema the Parquet file records (else Table 1).
    Rows with NaN features are an error unless ``drop_nan``.
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: no such file")
    fmt = _format_of(path)
    if fmt == "csv":
        try:
            raw = pd.read_csv(path, low_memory=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, ValueError) as exc:
            raise TableError(f"{path}: not a readable CSV table ({exc})") from None
        except OSError as exc:
            raise TableError(f"{path}: cannot read ({exc.strerror or exc})") from None
        schema = DEFAULT_SCHEMA if schema is None else schema
        frame, kind = _from_authors(raw, kind, schema, str(path))
    else:
        frame, meta = _read_parquet(path)
        kind = _kind_from_parquet(frame, meta, kind, str(path))
        if schema is None:
            schema = FeatureSchema.from_dict(meta["schema"], source=f"{path} metadata") if "schema" in meta else DEFAULT_SCHEMA
        _check_parquet_schema(meta, schema, str(path))
    samples = _validate(frame, kind, schema, str(path), drop_nan)
    if networks:
        samples = samples.select_networks(networks)
    return samples


def unnormalised_columns(samples: Samples, tolerance: float = 1e-3) -> list[tuple[str, float, float]]:
    """Feature columns with values outside [0, 1] (name, min, max): a table of raw units
    where normalised inputs belong (normalisation maps each schema range to [0, 1] and clips)."""
    x = samples.frame[samples.schema.feature_names]
    lo, hi = x.min(), x.max()
    bad = (lo < -tolerance) | (hi > 1 + tolerance)
    return [(str(c), float(lo[c]), float(hi[c])) for c in x.columns[bad.to_numpy()]]


def iter_feature_chunks(
    path: str | Path,
    schema: FeatureSchema = DEFAULT_SCHEMA,
    chunk_rows: int = 200_000,
    drop_nan: bool = False,
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Stream a table in chunks as (identity columns, normalised features) for prediction.

    Memory stays bounded by ``chunk_rows``; truth is optional. Features are checked chunk by
    chunk with the same rules (and messages) as ``read_samples``.
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: no such file")
    offset = 0
    if _format_of(path) == "csv":
        try:
            reader = pd.read_csv(path, chunksize=chunk_rows, low_memory=False)
            for raw in reader:
                frame, _ = _from_authors(raw, None, schema, str(path), need_truth=False)
                frame.index = pd.RangeIndex(offset, offset + len(frame))
                offset += len(frame)
                frame, _ = _check_features(frame, schema, str(path), drop_nan)
                yield _id_part(frame, schema), frame[schema.feature_names].to_numpy(np.float32)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, ValueError) as exc:
            raise TableError(f"{path}: not a readable CSV table ({exc})") from None
        return
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet table ({exc})") from None
    meta = _parquet_meta(pf.schema_arrow.metadata, str(path))
    _check_parquet_schema(meta, schema, str(path))
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            frame.index = pd.RangeIndex(offset, offset + len(frame))
            offset += len(frame)
            frame, _ = _check_features(frame, schema, str(path), drop_nan)
            yield _id_part(frame, schema), frame[schema.feature_names].to_numpy(np.float32)
    except (pa.ArrowException, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet table ({exc})") from None


def _id_part(frame: pd.DataFrame, schema: FeatureSchema) -> pd.DataFrame:
    features = set(schema.feature_names)
    return frame[[c for c in frame.columns if c not in features]]


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise TableError(f"{path}: unknown table format {suffix!r}; use .csv (authors) or .parquet")


def _from_authors(
    raw: pd.DataFrame, kind: Kind | None, schema: FeatureSchema, source: str, need_truth: bool = True
) -> tuple[pd.DataFrame, Kind]:
    """Rename the authors' columns to ours; infer the kind from the truth column."""
    raw = raw.drop(columns=[c for c in raw.columns if str(c).startswith("Unnamed: ")])
    if "s_index" in raw.columns:
        raw = raw.drop(columns="s_index")
    has = {k: AUTHORS_TRUTH[k] in raw.columns for k in AUTHORS_TRUTH}
    if kind is None:
        if has["fine"] and has["coarse"]:
            raise TableError(f"{source}: both 'gt' and 'SMAP' columns; pass the kind explicitly")
        kind = "coarse" if has["coarse"] else "fine"
    truth_col = AUTHORS_TRUTH[kind]
    if need_truth and truth_col not in raw.columns:
        other = [c for k, c in AUTHORS_TRUTH.items() if has[k]]
        hint = f" (it has {other[0]!r}: is it the other kind of table?)" if other else ""
        raise TableError(f"{source}: missing truth column {truth_col!r} of a {kind} table{hint}")
    numeric_names = [c for c in raw.columns if str(c).isdigit()]
    authors = set(schema.authors_columns)
    extra = [c for c in numeric_names if c not in authors]
    if extra:
        raise TableError(
            f"{source}: extra feature columns {extra[:MAX_SHOWN]}: schema {schema.name!r} has "
            f"{schema.n_features} features, columns '0'..'{schema.n_features - 1}'"
        )
    missing = [c for c in schema.authors_columns if c not in raw.columns]
    if missing:
        raise TableError(
            f"{source}: missing feature columns {missing[:MAX_SHOWN]}"
            f"{' and more' if len(missing) > MAX_SHOWN else ''} ({len(missing)} of {schema.n_features})"
        )
    rename = dict(zip(schema.authors_columns, schema.feature_names))
    rename[truth_col] = TRUTH
    frame = raw.rename(columns=rename)
    if "edate" in frame.columns:
        edate = pd.to_numeric(frame["edate"], errors="coerce")
        bad = edate.isna()
        if bad.any():
            raise TableError(f"{source}: column 'edate' is not a serial day at rows {_rows(bad)}")
        far = (edate < 0) | (edate > 2_958_465)  # 1899-12-30 to 9999-12-31
        if far.any():
            raise TableError(f"{source}: column 'edate' holds serial days outside years 1900-9999 at rows {_rows(far)}")
        frame = frame.drop(columns="edate").copy()
        frame["date"] = edate_to_date(edate)
    return frame, kind


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict]:
    try:
        table = pq.read_table(path)
        frame = table.to_pandas()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise TableError(f"{path}: not a readable Parquet table ({exc})") from None
    return frame, _parquet_meta(table.schema.metadata, str(path))


def _parquet_meta(metadata: dict | None, source: str) -> dict:
    """msda's record in a Parquet file's metadata (kind, schema); {} when absent."""
    if not metadata or PARQUET_META_KEY not in metadata:
        return {}
    try:
        meta = json.loads(metadata[PARQUET_META_KEY])
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("schema", {}), dict):
        raise TableError(f"{source}: malformed msda metadata in the Parquet file (not a JSON table with a schema)")
    return meta


def _kind_from_parquet(frame: pd.DataFrame, meta: dict, kind: Kind | None, source: str) -> Kind:
    recorded = meta.get("kind")
    if kind is None:
        if recorded in ("fine", "coarse"):
            return recorded
        return "fine" if "station" in frame.columns else "coarse"
    if recorded and recorded != kind:
        raise TableError(f"{source}: the file records a {recorded} table, {kind} was asked for")
    return kind


def _check_parquet_schema(meta: dict, schema: FeatureSchema, source: str) -> None:
    if "schema" in meta:
        recorded = FeatureSchema.from_dict(meta["schema"], source=f"{source} metadata")
        if not recorded.same_layout(schema):
            raise TableError(
                f"{source}: written with schema {recorded.name!r} ({recorded.n_features} features), "
                f"which differs from schema {schema.name!r} ({schema.n_features} features)"
            )


# ----- validation ---------------------------------------------------------------------------
def _rows(mask: pd.Series | np.ndarray, index: pd.Index | None = None) -> str:
    """The first offending row numbers of a boolean mask, for an error message."""
    mask = np.asarray(mask, dtype=bool)
    where = np.flatnonzero(mask)
    labels = where if index is None else np.asarray(index)[where]
    shown = ", ".join(str(int(i)) for i in labels[:MAX_SHOWN])
    more = f" and {len(where) - MAX_SHOWN} more" if len(where) > MAX_SHOWN else ""
    return f"{shown}{more}"


def _check_features(
    frame: pd.DataFrame, schema: FeatureSchema, source: str, drop_nan: bool
) -> tuple[pd.DataFrame, int]:
    """Missing, extra, non-numeric and NaN features; returns the frame and the rows dropped."""
    names = schema.feature_names
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise TableError(
            f"{source}: missing feature columns {missing[:MAX_SHOWN]}"
            f"{' and more' if len(missing) > MAX_SHOWN else ''} ({len(missing)} of {schema.n_features}, "
            f"schema {schema.name!r})"
        )
    known_series = {s.name for s in schema.series}
    feature_set = set(names)
    extra = [
        c
        for c in frame.columns
        if c not in feature_set
        and (str(c).isdigit() or (str(c).rsplit("_", 1)[0] in known_series and str(c).rsplit("_", 1)[-1].isdigit()))
    ]
    if extra:
        raise TableError(f"{source}: extra feature columns {extra[:MAX_SHOWN]} not in schema {schema.name!r}")
    for c in names:
        col = frame[c]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            as_num = pd.to_numeric(col, errors="coerce")
            bad = as_num.isna() & col.notna()
            if not bad.any():
                frame[c] = as_num
                continue
            first = col[bad].iloc[0]
            raise TableError(
                f"{source}: column {c!r} holds non-numeric values (e.g. {first!r}) at rows "
                f"{_rows(bad, frame.index)}"
            )
    feats = frame[names].to_numpy(dtype=np.float64)
    inf = np.isinf(feats)
    if inf.any():
        rows = inf.any(axis=1)
        raise TableError(
            f"{source}: {int(rows.sum())} rows have infinite features (first in column "
            f"{names[int(np.argmax(inf[np.argmax(rows)]))]!r}) at rows {_rows(rows, frame.index)}"
        )
    with np.errstate(invalid="ignore"):
        far = (feats < -FAR_OUTSIDE) | (feats > 1 + FAR_OUTSIDE)
    if far.any():
        rows = far.any(axis=1)
        r = int(np.argmax(rows))
        c = int(np.argmax(far[r]))
        raise TableError(
            f"{source}: column {names[c]!r} holds {feats[r, c]:g} at row {frame.index[r]} ({int(rows.sum())} rows "
            "far outside [0, 1]): features must be normalised (msda.FeatureSchema.normalise)"
        )
    nan_rows = np.isnan(feats).any(axis=1)
    dropped = int(nan_rows.sum())
    if dropped:
        if not drop_nan:
            first_col = names[int(np.argmax(np.isnan(feats[np.argmax(nan_rows)])))]
            raise TableError(
                f"{source}: {dropped} rows have NaN features (first in column {first_col!r}) at rows "
                f"{_rows(nan_rows, frame.index)}; pass --drop-nan to drop them"
            )
        frame = frame.loc[~nan_rows]
    return frame, dropped


def _validate(frame: pd.DataFrame, kind: Kind, schema: FeatureSchema, source: str, drop_nan: bool) -> Samples:
    frame = frame.reset_index(drop=True)
    if frame.empty:
        raise TableError(f"{source}: the table has no rows")
    missing_id = [c for c in REQUIRED_ID[kind] if c not in frame.columns]
    if TRUTH not in frame.columns:
        missing_id.append(TRUTH)
    if missing_id:
        raise TableError(f"{source}: missing column(s) {missing_id} of a {kind} table")
    frame, dropped = _check_features(frame, schema, source, drop_nan)

    truth = pd.to_numeric(frame[TRUTH], errors="coerce")
    bad = truth.isna() | (truth < 0) | (truth > 1)
    if bad.any():
        first = frame.loc[bad, TRUTH].iloc[0]
        raise TableError(
            f"{source}: truth column {TRUTH!r} must be soil moisture in [0, 1] m3/m3; "
            f"{int(bad.sum())} rows are not (e.g. {first!r}) at rows {_rows(bad, frame.index)}"
        )
    frame[TRUTH] = truth.astype(np.float64)
    for c, size in (("r", GRID_9KM.n_rows), ("c", GRID_9KM.n_cols)):
        v = pd.to_numeric(frame[c], errors="coerce")
        bad = v.isna() | (v != np.round(v)) | (v < 0) | (v >= size)
        if bad.any():
            raise TableError(
                f"{source}: column {c!r} must hold 9 km EASE-2 grid indices (whole numbers in [0, {size})); "
                f"{int(bad.sum())} rows do not (e.g. {frame.loc[bad, c].iloc[0]!r}) at rows {_rows(bad, frame.index)}"
            )
        frame[c] = v.astype(np.int64)
    frame["date"] = parse_dates(frame["date"], source, frame.index)
    for c in ("network", "station"):
        if c in frame.columns:
            frame[c] = frame[c].astype(str)

    key = ["network", "station", "date"] if "station" in frame.columns else ["r", "c", "date"]
    key = [k for k in key if k in frame.columns]
    dup = frame.duplicated(subset=key, keep=False)
    if dup.any():
        first = frame.loc[dup, key].iloc[0].to_dict()
        raise TableError(
            f"{source}: {int(dup.sum())} rows duplicate a ({', '.join(key)}) key, e.g. {first}, at rows "
            f"{_rows(dup, frame.index)}"
        )
    ordered = [c for c in ID_COLUMNS if c in frame.columns] + [TRUTH]
    others = [c for c in frame.columns if c not in ordered and c not in set(schema.feature_names)]
    frame = frame[ordered + others + schema.feature_names].reset_index(drop=True)
    return Samples(frame=frame, kind=kind, schema=schema, source=source, dropped_nan=dropped)


def parse_dates(values: pd.Series, source: str, index: pd.Index) -> pd.Series:
    """Dates (day resolution); one TableError naming the rows that are not dates."""
    if pd.api.types.is_datetime64_any_dtype(values):
        dates = values
    else:
        dates = pd.to_datetime(values, errors="coerce", format="mixed") if values.dtype == object else \
            pd.to_datetime(values, errors="coerce")
    bad = dates.isna()
    if bad.any():
        raise TableError(
            f"{source}: column 'date' holds {int(bad.sum())} values that are not dates (e.g. "
            f"{values[bad].iloc[0]!r}) at rows {_rows(bad, index)}"
        )
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    return dates.dt.normalize()


def samples_from_frame(
    frame: pd.DataFrame, kind: Kind, schema: FeatureSchema = DEFAULT_SCHEMA, drop_nan: bool = False,
    source: str = "<frame>",
) -> Samples:
    """Validate an in-memory frame in our layout (feature names, ``sm_m3m3``, ``date``); errors
    name ``source``."""
    return _validate(frame.copy(), kind, schema, source, drop_nan)


# ----- writing ------------------------------------------------------------------------------
def write_samples(samples: Samples, path: str | Path, force: bool = False) -> Path:
    """Write atomically: ``.csv`` in the authors' layout, ``.parquet`` in ours.

    An existing ``path`` is replaced only when msda wrote it as a sample table (or ``force``);
    never the table the samples were read from.
    """
    path = Path(path)
    fmt = _format_of(path)
    with atomic_path(path, "samples", inputs=(samples.source,), force=force) as tmp:
        if fmt == "csv":
            to_authors(samples).to_csv(tmp, index=samples.kind == "fine", float_format="%.9g")
        else:
            table = pa.Table.from_pandas(samples.frame, preserve_index=False)
            meta = {
                "kind": samples.kind,
                "schema": samples.schema.to_dict(),
                "normalised": True,
                "truth_units": "m3/m3",
            }
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_META_KEY: json.dumps(meta)})
            pq.write_table(table, tmp)
    return path


def to_authors(samples: Samples) -> pd.DataFrame:
    """Our frame -> the authors' layout (``"0"``.., ``gt``/``SMAP``, ``edate``; fine: ``s_index``)."""
    f = samples.frame
    schema = samples.schema
    out = f[schema.feature_names].copy()
    out.columns = schema.authors_columns
    out[AUTHORS_TRUTH[samples.kind]] = f[TRUTH].to_numpy()
    for c in ("network", "station", "r", "c"):
        if c in f.columns:
            out[c] = f[c].to_numpy()
    out["edate"] = date_to_edate(f["date"])
    feature_set = set(schema.feature_names)
    for c in f.columns:
        if c not in out.columns and c not in feature_set and c not in (TRUTH, "date"):
            out[c] = f[c].to_numpy()
    if samples.kind == "fine":
        out.index = pd.RangeIndex(len(out), name="s_index")
    return out
