"""ISMN downloads (zip or folder, "header + values" or CEOP-like separate files) -> a station
table and daily surface soil moisture, read with the ``ismn`` package (TU Wien).

- Surface sensors only: soil moisture sensors whose depth range lies within 0 to ``max_depth``
  (0.05 m) plus ``tolerance`` (5.1 mm, so that 2-inch = 0.0508 m probes count).
- Quality flags: a value is kept when every code of its ISMN flag (e.g. ``D03,D05``) is allowed;
  an allowed entry is a letter (``G``, ``U``, ``D``, ``C``, ``M``) or a full code (``D03``).
  The default keeps ``G``; older downloads flag everything ``U`` or ``D``: ``flags=("G", "U")``.
- Daily means per sensor (UTC calendar days), then the mean of the sensors of one 50 m cell:
  the sensors of a station, and of the stations of a network that share a 50 m cell (listed in
  the station table's ``merged`` column; the first name is kept).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from msda.errors import MsdaError
from msda.grids import GRID_9KM, GRID_50M
from msda.io import atomic_path

MAX_DEPTH_M = 0.05
TOLERANCE_M = 0.0051
FLAG_LETTERS = set("GDCMU")


class PrepareError(MsdaError):
    """Bad or empty input for the preparation of samples."""


@dataclass
class IsmnTables:
    stations: pd.DataFrame  # one row per station (50 m cell)
    daily: pd.DataFrame  # network, station, date, sm_m3m3, n_sensors, n_obs
    settings: dict


def _flag_filter(flags: Sequence[str]) -> tuple[set[str], set[str]]:
    letters, codes = set(), set()
    for f in flags:
        f = f.strip().upper()
        if not f:
            continue
        if len(f) == 1 and f in FLAG_LETTERS:
            letters.add(f)
        elif re.fullmatch(r"[GDCMU]\d{2}", f):
            codes.add(f)
        else:
            raise PrepareError(f"unknown ISMN quality flag {f!r}; use letters G, U, D, C, M or codes like D03")
    if not letters and not codes:
        raise PrepareError("no quality flags to keep (e.g. --flags G or --flags G,U)")
    return letters, codes


def _allowed(flag_column: pd.Series, letters: set[str], codes: set[str]) -> np.ndarray:
    """Per value: every comma-separated code of its flag is allowed."""
    uniq = pd.unique(flag_column.astype(str))
    ok = {}
    for u in uniq:
        parts = [p.strip() for p in u.split(",") if p.strip()]
        ok[u] = bool(parts) and all(p in codes or p[0] in letters for p in parts)
    return flag_column.astype(str).map(ok).to_numpy(bool)


@contextlib.contextmanager
def _quiet_logs():
    import logging

    loggers = [logging.getLogger(n) for n in ("ismn_meta_collector", "ismn", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _network_of(ismn_name: str, file_path: str) -> str:
    """ISMN file names read CSE_NETWORK_STATION_...; some archives nest a folder that the
    ``ismn`` package takes for the network: then the file name tells."""
    base = Path(str(file_path)).name
    parts = base.split("_")
    if len(parts) > 2 and parts[1] != ismn_name and not base.startswith(f"{parts[0]}_{ismn_name}_"):
        return parts[1]
    return ismn_name


def read_ismn(
    path: str | Path,
    networks: Sequence[str] | None = None,
    flags: Sequence[str] = ("G",),
    max_depth: float = MAX_DEPTH_M,
    tolerance: float = TOLERANCE_M,
    meta_cache: str | Path | None = None,
    progress: bool = True,
) -> IsmnTables:
    """Read an ISMN download; see the module docstring for the selection and averaging. Stages:
    the sensors' metadata, the surface sensors of the networks asked for, their daily means of
    the flags kept, then one series per 50 m cell and the stations table."""
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{path}: no such ISMN download (zip or folder)")
    letters, codes = _flag_filter(flags)
    with tempfile.TemporaryDirectory(prefix="msda-ismn-") as tmp:
        ds = _open_ismn(path, Path(meta_cache) if meta_cache else Path(tmp))
        surface = _surface_sensors(_sensor_table(ds), path, networks, max_depth, tolerance)
        daily_parts, flag_counts, n_in = _daily_per_sensor(ds, surface, letters, codes, progress)
    if not daily_parts:
        seen = ", ".join(f"{k} ({v})" for k, v in flag_counts.most_common(8))
        raise PrepareError(
            f"{path}: no surface soil moisture left after keeping flags {','.join(flags)} "
            f"({n_in} values; their flags: {seen}); older downloads flag everything U or D: try --flags G,U"
        )
    stations, daily = _per_cell(surface, pd.concat(daily_parts, ignore_index=True))
    settings = {"source": str(path), "networks": list(networks or []), "flags": list(flags),
                "max_depth_m": max_depth, "tolerance_m": tolerance}
    return IsmnTables(stations, daily, settings)


def _open_ismn(path: Path, meta_dir: Path):
    try:
        from ismn.interface import ISMN_Interface
    except ImportError:  # pragma: no cover - a dependency of msda
        raise PrepareError("the 'ismn' package is needed to read ISMN downloads: pip install ismn") from None
    try:
        # the package prints its metadata steps, a progress bar and warnings on missing static files
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), _quiet_logs():
            return ISMN_Interface(str(path), meta_path=str(meta_dir / path.stem), parallel=False)
    except Exception as exc:  # the package raises plain exceptions on broken archives
        raise PrepareError(f"{path}: not a readable ISMN download ({type(exc).__name__}: {exc})") from None


def _sensor_table(ds) -> pd.DataFrame:
    """One row per sensor of the download: network, station, variable, depths, position, file."""
    meta = ds.metadata
    col = lambda name: meta[(name, "val")]  # noqa: E731
    table = pd.DataFrame({
        "idx": meta.index,
        "ismn_network": col("network").astype(str),
        "station": col("station").astype(str),
        "variable": col("variable").astype(str),
        "depth_from": meta[("variable", "depth_from")].astype(float),
        "depth_to": meta[("variable", "depth_to")].astype(float),
        "instrument": col("instrument").astype(str),
        "lon": col("longitude").astype(float),
        "lat": col("latitude").astype(float),
        "elevation": pd.to_numeric(col("elevation"), errors="coerce"),
        "file": meta[("file_path", "val")].astype(str),
    })
    table["network"] = [_network_of(n, f) for n, f in zip(table["ismn_network"], table["file"])]
    return table


def _surface_sensors(table: pd.DataFrame, path: Path, networks: Sequence[str] | None, max_depth: float,
                     tolerance: float) -> pd.DataFrame:
    """The soil moisture sensors of ``networks`` within ``max_depth`` (+ ``tolerance``) of the surface."""
    found = sorted(table["network"].unique())
    if networks:
        wanted = {n.strip().upper(): n.strip() for n in networks if n.strip()}
        missing = [v for k, v in wanted.items() if k not in {f.upper() for f in found}]
        if missing:
            raise PrepareError(f"{path}: no network {missing[0]!r} in this download (networks: {', '.join(found)})")
        table = table[table["network"].str.upper().isin(wanted)]
    sm = table[table["variable"] == "soil_moisture"]
    if sm.empty:
        raise PrepareError(f"{path}: no soil moisture sensors in networks {', '.join(sorted(table['network'].unique()))}")
    surface = sm[(sm["depth_from"] >= -1e-9) & (sm["depth_to"] <= max_depth + tolerance)]
    if surface.empty:
        depths = ", ".join(sorted({f"{a:.2f}-{b:.2f} m" for a, b in zip(sm["depth_from"], sm["depth_to"])}))
        raise PrepareError(
            f"{path}: no surface soil moisture sensors (0-{max_depth:g} m, +{tolerance * 1000:.1f} mm); "
            f"the sensors here measure {depths}"
        )
    return surface


def _daily_per_sensor(ds, surface: pd.DataFrame, letters, codes, progress: bool):
    """Daily means of each sensor's values with a kept flag: (the per-sensor frames, the flags
    seen, the values read)."""
    from tqdm.auto import tqdm

    from msda.runtime import bar_interval

    daily_parts, flag_counts, n_in = [], Counter(), 0
    for _, s in tqdm(surface.iterrows(), total=len(surface), desc="ISMN sensors", disable=not progress,
                     mininterval=bar_interval()):
        data = ds.read_ts(int(s["idx"]))
        n_in += len(data)
        flag_counts.update(data["soil_moisture_flag"].astype(str))
        keep = _allowed(data["soil_moisture_flag"], letters, codes) & data["soil_moisture"].notna().to_numpy()
        values = data.loc[keep, "soil_moisture"].astype(float)
        if values.empty:
            continue
        day = values.groupby(values.index.floor("D")).agg(["mean", "size"])
        daily_parts.append(pd.DataFrame({"network": s["network"], "station": s["station"], "sensor": s["file"],
                                         "date": day.index, "sm": day["mean"].to_numpy(),
                                         "n_obs": day["size"].to_numpy()}))
    return daily_parts, flag_counts, n_in


def _per_cell(surface: pd.DataFrame, per_sensor: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stations table and one daily series per 50 m cell of a network (the first station's
    name stands for the cell; the others are listed in ``merged``)."""
    st = surface.groupby(["network", "station"], sort=True).agg(
        lon=("lon", "first"), lat=("lat", "first"), elevation=("elevation", "first"),
        depth_from=("depth_from", "min"), depth_to=("depth_to", "max"),
        instruments=("instrument", lambda v: ",".join(sorted(set(v)))),
    ).reset_index()
    st = st[st.set_index(["network", "station"]).index.isin(per_sensor.set_index(["network", "station"]).index.unique())]
    st = st.reset_index(drop=True)
    st["r"], st["c"] = GRID_9KM.lonlat_to_rowcol(st["lon"].to_numpy(), st["lat"].to_numpy())
    st["row_50m"], st["col_50m"] = GRID_50M.lonlat_to_rowcol(st["lon"].to_numpy(), st["lat"].to_numpy())
    st["cell_station"] = st.groupby(["network", "row_50m", "col_50m"])["station"].transform("first")
    merged = st.groupby(["network", "cell_station"])["station"].agg(lambda v: ",".join(v[1:]))
    rename = dict(zip(zip(st["network"], st["station"]), st["cell_station"]))
    per_sensor["station"] = [rename[k] for k in zip(per_sensor["network"], per_sensor["station"])]
    daily = per_sensor.groupby(["network", "station", "date"], sort=True).agg(
        sm_m3m3=("sm", "mean"), n_sensors=("sensor", "nunique"), n_obs=("n_obs", "sum")).reset_index()
    stations = st[st["station"] == st["cell_station"]].drop(columns="cell_station").copy()
    stations["merged"] = [merged.get((n, s), "") for n, s in zip(stations["network"], stations["station"])]
    counts = per_sensor.groupby(["network", "station"])["sensor"].nunique()
    span = daily.groupby(["network", "station"])["date"].agg(["min", "max", "size"])
    key = list(zip(stations["network"], stations["station"]))
    stations["n_sensors"] = [int(counts[k]) for k in key]
    stations["first_date"] = [span.loc[k, "min"] for k in key]
    stations["last_date"] = [span.loc[k, "max"] for k in key]
    stations["n_days"] = [int(span.loc[k, "size"]) for k in key]
    return stations.reset_index(drop=True), daily


def write_ismn(tables: IsmnTables, out: str | Path, force: bool = False) -> Path:
    """``out/stations.parquet``, ``out/daily.parquet`` and ``out/prepare.json``, atomically."""
    from msda.provenance import provenance

    out = Path(out)
    with atomic_path(out, "ismn", inputs=(tables.settings.get("source"),), force=force) as tmp:
        tmp.mkdir()
        tables.stations.to_parquet(tmp / "stations.parquet", index=False)
        tables.daily.to_parquet(tmp / "daily.parquet", index=False)
        record = provenance(task="prepare ismn", stations=len(tables.stations), days=len(tables.daily), **tables.settings)
        (tmp / "prepare.json").write_text(json.dumps(record, indent=2, default=str))
    return out
