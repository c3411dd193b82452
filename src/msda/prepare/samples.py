"""Sample tables from per-site time series (like the authors' Earth Engine exports).

Inputs, one row per station (and date where dated), matched on ``network`` and ``station``:

- ``sar``: date, vv (dB), vh (dB), angle (deg); Sentinel-1 over the station's 50 m cell
  (several acquisitions on one day are averaged);
- ``daily``: date and one column per series of the schema (``ndvi``, ``t2m`` degC, ``tp`` m/d
  for Table 1); NDVI may be sparse (16-day composites);
- ``static``: the static inputs of the schema in raw units (sand, clay, bulk_density, elevation,
  slope, aspect_deg for Table 1);
- ``stations``: 9 km EASE-2 ``r`` and ``c`` (``msda prepare ismn`` writes them);
- ``truth``: date, sm_m3m3 (daily in situ for a 50 m table, daily SMAP for a 9 km table).

A sample is a Sentinel-1 date with a truth value on the same day. Its series are the 46 8-day
means of the 368 days before the date (step 0 the oldest, 45 the 8 days before it); steps with
no data are filled linearly from their neighbours in the series (the nearest at its ends).
Stations need more than 5 coincident dates (``min_dates``). Features go through the schema
(encodings and min-max normalisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from msda.prepare.ismn import PrepareError
from msda.schema import DEFAULT_SCHEMA, FeatureSchema
from msda.tables import Samples, samples_from_frame

KEYS = ["network", "station"]


STATION_COLUMNS = ("network", "station", "lon", "lat")


def read_table(path: str | Path, what: str, need: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV or Parquet table; ``what`` names it in errors; ``need``: columns it must have."""
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{path}: no such {what} table")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except (pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise PrepareError(f"{path}: not a readable {what} table ({str(exc).splitlines()[0][:200]})") from None
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read the {what} table ({exc.strerror or exc})") from None
    frame.attrs["source"] = str(path)
    _need(frame, list(need), what)
    return frame


def _need(frame: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        src = frame.attrs.get("source", f"the {what} table")
        raise PrepareError(f"{src}: no column {missing[0]!r} in the {what} table (has {', '.join(map(str, frame.columns[:12]))})")


def _dated(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    _need(frame, KEYS + ["date"], what)
    out = frame.copy()
    out["station"] = out["station"].astype(str)
    out["network"] = out["network"].astype(str)
    out["date"] = pd.to_datetime(out["date"]).dt.normalize()
    return out


MAX_GAP_STEPS = 2  # empty steps filled from their neighbours only in runs of at most this many


def eight_day_series(daily: pd.Series, dates: pd.DatetimeIndex, steps: int = 46, step_days: int = 8,
                     max_gap: int = MAX_GAP_STEPS) -> np.ndarray:
    """(len(dates), steps) means of ``daily`` (a date-indexed series with gaps) over steps of
    ``step_days`` days before each date (the schema's ``step_days``; 8 in Table 1).

    Gap rule: a run of at most ``max_gap`` empty steps is filled linearly from the steps on
    either side (at the ends, from the nearest); a longer run stays NaN, and the sample then has
    NaN features (an error, or dropped with ``drop_nan``)."""
    daily = daily.dropna()
    if daily.empty:
        return np.full((len(dates), steps), np.nan)
    start = min(dates.min() - pd.Timedelta(days=steps * step_days), daily.index.min())
    days = pd.date_range(start, max(dates.max(), daily.index.max()), freq="D")
    v = daily.groupby(level=0).mean().reindex(days)
    ok = v.notna().to_numpy()
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, v.to_numpy(), 0.0))])
    cn = np.concatenate([[0], np.cumsum(ok)])
    day0 = ((dates - days[0]).days.to_numpy())[:, None]
    starts = day0 - steps * step_days + step_days * np.arange(steps)[None, :]
    total, count = cs[starts + step_days] - cs[starts], cn[starts + step_days] - cn[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    x = np.arange(steps)
    for i in np.flatnonzero(np.isnan(out).any(axis=1)):
        empty = np.isnan(out[i])
        if empty.all():
            continue
        filled = np.interp(x, x[~empty], out[i, ~empty])
        # runs of empty steps: fill the short ones only
        edges = np.flatnonzero(np.diff(np.concatenate([[0], empty.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            if b - a <= max_gap:
                out[i, a:b] = filled[a:b]
    return out


def build_samples(
    sar: pd.DataFrame,
    daily: pd.DataFrame,
    static: pd.DataFrame,
    stations: pd.DataFrame,
    truth: pd.DataFrame,
    kind: str = "fine",
    schema: FeatureSchema = DEFAULT_SCHEMA,
    min_dates: int = 6,
    lc: pd.DataFrame | None = None,
    drop_nan: bool = False,
) -> Samples:
    """The sample table of ``kind`` (fine: in-situ truth; coarse: SMAP truth). Series follow
    the schema's length and ``step_days`` and the gap rule of :func:`eight_day_series`; rows
    left with NaN features are an error unless ``drop_nan``."""
    sar, daily, truth = _dated(sar, "sar"), _dated(daily, "daily"), _dated(truth, "truth")
    _need(truth, ["sm_m3m3"], "truth")
    _need(stations, KEYS + ["r", "c"], "stations")
    _need(static, KEYS, "static")
    series_names = [s.name for s in schema.series]
    _need(daily, series_names, "daily")
    stations = stations.assign(station=stations["station"].astype(str), network=stations["network"].astype(str))
    static = static.assign(station=static["station"].astype(str), network=static["network"].astype(str))

    sar_cols = [c for c in sar.columns if c not in KEYS + ["date"]]
    acq = sar.groupby(KEYS + ["date"], sort=True)[sar_cols].mean(numeric_only=True).reset_index()
    day_truth = truth.groupby(KEYS + ["date"], sort=True)["sm_m3m3"].mean().reset_index()
    samples = acq.merge(day_truth, on=KEYS + ["date"])
    if samples.empty:
        raise PrepareError("no Sentinel-1 date coincides with a truth date at any station")
    counts = samples.groupby(KEYS)["date"].transform("size")
    samples = samples[counts >= min_dates]
    if samples.empty:
        best = int(counts.max())
        raise PrepareError(f"no station has {min_dates} or more coincident Sentinel-1 and truth dates (the most is {best})")
    for table, what in ((stations, "stations"), (static, "static")):
        known = set(zip(table["network"], table["station"]))
        lost = [k for k in zip(samples["network"], samples["station"]) if k not in known]
        if lost:
            raise PrepareError(f"station {lost[0][1]!r} ({lost[0][0]}) is not in the {what} table")
    samples = samples.merge(stations[KEYS + ["r", "c"]], on=KEYS).merge(static, on=KEYS, suffixes=("", "_static"))
    samples = samples.sort_values(KEYS + ["date"]).reset_index(drop=True)
    samples["doy"] = samples["date"].dt.day_of_year.astype(float)
    samples["row_9km"], samples["col_9km"] = samples["r"].astype(float), samples["c"].astype(float)

    series_cols: dict[str, np.ndarray] = {}
    for s in schema.series:
        block = np.full((len(samples), s.length), np.nan)
        for (net, st), idx in samples.groupby(KEYS).indices.items():
            d = daily[(daily["network"] == net) & (daily["station"] == st)].set_index("date")[s.name]
            block[idx] = eight_day_series(d, pd.DatetimeIndex(samples["date"].to_numpy()[idx]), s.length, s.step_days)
            if np.isnan(block[idx]).all():
                raise PrepareError(f"station {st!r} ({net}): no {s.name} values in the daily table")
        for j, col in enumerate(s.column_names()):
            series_cols[col] = block[:, j]
    raw = pd.concat([samples, pd.DataFrame(series_cols, index=samples.index)], axis=1)
    try:
        features = schema.normalise(schema.encode(raw))
    except Exception as exc:
        raise PrepareError(f"cannot build the features: {exc}") from None
    ids = samples[KEYS + ["r", "c", "date"]].copy()
    if lc is not None:
        ids = ids.merge(lc.assign(station=lc["station"].astype(str))[KEYS + ["lc"]], on=KEYS, how="left")
    frame = pd.concat([ids, samples[["sm_m3m3"]], pd.DataFrame(features, columns=schema.feature_names)], axis=1)
    return samples_from_frame(frame, kind, schema, drop_nan)
