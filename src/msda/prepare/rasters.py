"""Area-weighted aggregation (AWA) of rasters onto EASE-2 cells (METHOD.md section 2).

A target cell takes the mean of the source pixels it overlaps, weighted by the overlap area;
nodata pixels are left out. The overlap arithmetic is GDAL's (``rasterio.warp.reproject`` with
``Resampling.average``, which weights each source pixel by its fractional overlap of the target
cell). Angles (aspect) are aggregated through their sine and cosine and returned in degrees.
Any raster GDAL reads works: GeoTIFF, Cloud-Optimized GeoTIFF, NetCDF (``NETCDF:file:var``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from msda.grids import CRS, GRIDS, Ease2Grid
from msda.prepare.ismn import PrepareError


def _grid(grid: str | Ease2Grid) -> Ease2Grid:
    if isinstance(grid, Ease2Grid):
        return grid
    if grid not in GRIDS:
        raise PrepareError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
    return GRIDS[grid]


def _open(path: str | Path):
    import rasterio

    try:
        src = rasterio.open(str(path))
    except rasterio.errors.RasterioIOError as exc:
        raise PrepareError(f"{path}: cannot open the raster ({exc})") from None
    if src.crs is None:
        src.close()
        raise PrepareError(f"{path}: the raster has no CRS; set one (e.g. gdal_edit.py -a_srs EPSG:4326)")
    return src


def aggregate_window(
    path: str | Path,
    grid: str | Ease2Grid,
    row0: int,
    col0: int,
    n_rows: int,
    n_cols: int,
    band: int = 1,
    angle: bool = False,
) -> np.ndarray:
    """AWA of one band onto the EASE-2 cells rows row0.., cols col0.. (NaN: no valid pixel)."""
    from rasterio.warp import Resampling, reproject, transform_bounds
    from rasterio.windows import Window, from_bounds

    g = _grid(grid)
    dst_transform = g.transform(row0, col0)
    left, top = dst_transform.c, dst_transform.f
    right, bottom = left + n_cols * g.cell_m, top - n_rows * g.cell_m
    with _open(path) as src:
        if not 1 <= band <= src.count:
            raise PrepareError(f"{path}: no band {band} (the raster has {src.count})")
        # read only the source pixels under the target cells (plus a margin of 2 pixels)
        b = transform_bounds(CRS, src.crs, left, bottom, right, top, densify_pts=21)
        win = from_bounds(*b, transform=src.transform)
        r0, c0 = max(int(np.floor(win.row_off)) - 2, 0), max(int(np.floor(win.col_off)) - 2, 0)
        r1 = min(int(np.ceil(win.row_off + win.height)) + 2, src.height)
        c1 = min(int(np.ceil(win.col_off + win.width)) + 2, src.width)
        if r1 <= r0 or c1 <= c0:
            return np.full((n_rows, n_cols), np.nan)
        window = Window(c0, r0, c1 - c0, r1 - r0)
        src_arr = src.read(band, window=window, masked=True).astype(np.float64).filled(np.nan)
        src_transform = src.window_transform(window)
        src_crs = src.crs

    def warp(arr: np.ndarray) -> np.ndarray:
        dst = np.full((n_rows, n_cols), np.nan)
        reproject(arr, dst, src_transform=src_transform, src_crs=src_crs, src_nodata=np.nan,
                  dst_transform=dst_transform, dst_crs=CRS, dst_nodata=np.nan, resampling=Resampling.average)
        return dst

    if not angle:
        return warp(src_arr)
    rad = np.deg2rad(src_arr)
    s, c = warp(np.sin(rad)), warp(np.cos(rad))
    return np.rad2deg(np.arctan2(s, c)) % 360.0


def aggregate_at_stations(
    path: str | Path,
    stations: pd.DataFrame,
    grid: str | Ease2Grid = "50m",
    band: int = 1,
    angle: bool = False,
) -> pd.Series:
    """AWA of one band on each station's cell of ``grid`` (``stations`` has station, lon, lat).

    A station whose cell lies outside the raster, or over nodata only, is an error naming it.
    """
    from rasterio.warp import transform_bounds

    g = _grid(grid)
    for col in ("station", "lon", "lat"):
        if col not in stations:
            raise PrepareError(f"the station table needs 'station', 'lon', 'lat'; missing {col!r}")
    rows, cols = g.lonlat_to_rowcol(stations["lon"].to_numpy(), stations["lat"].to_numpy())
    with _open(path) as src:
        left, bottom, right, top = transform_bounds(src.crs, CRS, *src.bounds)
    out = np.full(len(stations), np.nan)
    for i, (r, c) in enumerate(zip(rows, cols)):
        x0, b, rr, t = g.bounds(r, c)
        name = stations["station"].iloc[i]
        if x0 < left or rr > right or b < bottom or t > top:
            raise PrepareError(f"station {name!r} (lon {stations['lon'].iloc[i]}, lat {stations['lat'].iloc[i]}): "
                               f"its {g.name} cell lies outside {path}")
        out[i] = aggregate_window(path, g, int(r), int(c), 1, 1, band, angle)[0, 0]
        if np.isnan(out[i]):
            raise PrepareError(f"station {name!r}: only nodata in {path} over its {g.name} cell")
    return pd.Series(out, index=stations["station"].astype(str).to_numpy(), name=Path(str(path)).stem)


DATE_PATTERNS = (r"(\d{4})-(\d{2})-(\d{2})", r"(\d{4})(\d{2})(\d{2})", r"(\d{4})_(\d{2})_(\d{2})")


def find_date(name: str, prefix: str = "", at_end: bool = False) -> tuple[int, pd.Timestamp] | None:
    """The first valid date (YYYY-MM-DD, YYYYMMDD or YYYY_MM_DD) in ``name``, after ``prefix``
    and, with ``at_end``, ending the name: (where its match starts, the date), or None."""
    import re

    for pattern in DATE_PATTERNS:
        m = re.search(re.escape(prefix) + pattern + ("$" if at_end else ""), name)
        if m:
            try:
                return m.start(), pd.Timestamp(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                continue
    return None


def date_of_file(path: str | Path) -> pd.Timestamp:
    """The date in a file name: YYYY-MM-DD, YYYYMMDD or YYYY_MM_DD."""
    found = find_date(Path(str(path)).name)
    if found is not None:
        return found[1]
    raise PrepareError(f"{path}: no date (YYYY-MM-DD, YYYYMMDD or YYYY_MM_DD) in the file name")


def series_from_rasters(
    files: list[str | Path],
    stations: pd.DataFrame,
    name: str,
    grid: str | Ease2Grid = "50m",
    band: int = 1,
    skip_nodata: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Dated rasters (one date per file, the date in its name) -> a long table
    network, station, date, ``name`` of AWA values on the stations' cells.

    Stations over nodata on a date (clouds, no acquisition) get no row for that date when
    ``skip_nodata``; a station outside a raster is always an error.
    """
    from tqdm.auto import tqdm

    from msda.runtime import bar_interval

    if not files:
        raise PrepareError(f"no raster files for {name!r}")
    g = _grid(grid)
    rows, cols = g.lonlat_to_rowcol(stations["lon"].to_numpy(), stations["lat"].to_numpy())
    parts = []
    for path in tqdm(sorted(map(str, files)), desc=name, unit=" rasters", disable=not progress,
                     mininterval=bar_interval()):
        day = date_of_file(path)
        values = np.array([aggregate_window(path, g, int(r), int(c), 1, 1, band)[0, 0] for r, c in zip(rows, cols)])
        if not skip_nodata and np.isnan(values).any():
            bad = stations["station"].iloc[int(np.flatnonzero(np.isnan(values))[0])]
            raise PrepareError(f"station {bad!r}: only nodata in {path} over its {g.name} cell")
        part = stations[[c for c in ("network", "station") if c in stations]].copy()
        part["date"], part[name] = day, values
        parts.append(part[np.isfinite(values)])
    return pd.concat(parts, ignore_index=True)


# ----- tables at the stations (what msda prepare static / series write) -------------------------
def parse_static_spec(spec: str) -> tuple[str, str, int, bool]:
    """``NAME=FILE[:angle][:bandN]`` -> (name, file, band, angle)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise PrepareError(f"--raster {spec!r}: expected NAME=FILE[:angle][:bandN]")
    path, *opts = rest.split(":")
    unknown = [o for o in opts if o != "angle" and not (o.startswith("band") and o[4:].isdigit())]
    if unknown:
        raise PrepareError(f"--raster {spec!r}: unknown option {unknown[0]!r} (angle, bandN)")
    band = next((int(o[4:]) for o in opts if o.startswith("band")), 1)
    return name, path, band, "angle" in opts


def parse_series_spec(spec: str) -> tuple[str, list[str]]:
    """``NAME=GLOB`` -> (name, the matching files, sorted)."""
    import glob

    name, sep, pattern = spec.partition("=")
    if not sep or not name or not pattern:
        raise PrepareError(f"--raster {spec!r}: expected NAME=GLOB")
    files = sorted(glob.glob(pattern))
    if not files:
        raise PrepareError(f"--raster {spec!r}: no file matches {pattern!r}")
    return name, files


def static_at_stations(stations: pd.DataFrame, specs: list[str], grid: str = "50m") -> pd.DataFrame:
    """One row per station (network, station) and one column per ``NAME=FILE[:angle][:bandN]``:
    each raster's area-weighted mean over the station's cell of ``grid``."""
    table = stations[[c for c in ("network", "station") if c in stations]].copy()
    for name, path, band, angle in [parse_static_spec(spec) for spec in specs]:  # every spec checked first
        table[name] = aggregate_at_stations(path, stations, grid, band=band, angle=angle).to_numpy()
    return table


def series_at_stations(stations: pd.DataFrame, specs: list[str], grid: str = "50m") -> pd.DataFrame:
    """network, station, date and one column per ``NAME=GLOB`` of dated rasters (outer-joined)."""
    table = None
    for name, files in [parse_series_spec(spec) for spec in specs]:  # every pattern checked before any read
        part = series_from_rasters(files, stations, name, grid)
        table = part if table is None else table.merge(part, on=["network", "station", "date"], how="outer")
    return table.sort_values(["network", "station", "date"]).reset_index(drop=True)


def write_table(table: pd.DataFrame, out: str | Path, kind: str, inputs=(), force: bool = False) -> Path:
    """Write a prepared table atomically: CSV for a ``.csv`` name, else Parquet."""
    from msda.io import atomic_path

    out = Path(out)
    with atomic_path(out, kind, inputs=inputs, force=force) as tmp:
        table.to_csv(tmp, index=False) if out.suffix.lower() == ".csv" else table.to_parquet(tmp, index=False)
    return out
