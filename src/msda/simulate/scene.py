"""A synthetic 50 m scene for ``msda map --inputs demo``: a few 9 km cells at 50 m, several dates.

The same physics as the benchmark (docs/simulate.md): the weather generator per 9 km cell (as
ERA5-Land would give it), the 0-5 cm bucket model and NDVI per 50 m pixel, Sentinel-1 from the
Oh model under a Water Cloud with 50 m speckle. The land surface is spatially coherent: soil
texture and a terrain model are smooth random fields at several scales, slope and aspect are
derived from the terrain model, and a lake leaves the SAR as nodata. The true soil moisture of
each date comes with the inputs (``sm_true``) so that a map can be checked against it.

Variables are those of the default schema (Table 1) in raw units: ``vv``, ``vh``, ``angle``
(time, y, x); ``sand``, ``clay``, ``bulk_density``, ``elevation``, ``slope``, ``aspect_deg``
(y, x); ``ndvi``, ``t2m``, ``tp`` (time, step, y, x), step 0 the oldest of the 46 8-day steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy.ndimage import gaussian_filter

from msda.errors import MsdaError
from msda.grids import CRS, GRID_9KM, GRID_50M, xy_to_lonlat
from msda.simulate import physics
from msda.simulate.generator import (
    HISTORY_DAYS,
    C,
    SPINUP_DAYS,
    STEP_DAYS,
    STEPS,
    SurfaceParams,
    _climate,
    _elevation,
    _weather,
    water_and_greenness,
)

S1_REPEAT_DAYS = 12


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """A smooth random field of unit variance in expectation (Gaussian-filtered white noise).

    The scale is that of the infinite field (variance 1 / (4 pi sigma^2) before scaling), so a
    small scene is a window of a large one, not a field stretched to unit sample variance.
    """
    return gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect") * 2 * np.sqrt(np.pi) * sigma_px


def scene_extent(cells: tuple[int, int], lon: float, lat: float, shape: tuple[int, int] | None = None):
    """First 50 m row and column and the shape of a scene of ``cells`` 9 km cells from (lon, lat)."""
    r9, c9 = GRID_9KM.lonlat_to_rowcol(lon, lat)
    k = GRID_9KM.ratio(GRID_50M)
    if shape is None:
        if min(cells) < 1:
            raise MsdaError(f"a scene needs at least 1 x 1 cells of 9 km, got {cells[0]} x {cells[1]}")
        shape = (cells[0] * k, cells[1] * k)
    if min(shape) < 8:
        raise MsdaError(f"a scene needs at least 8 x 8 pixels of 50 m, got {shape[0]} x {shape[1]}")
    return int(r9) * k, int(c9) * k, shape


def simulate_scene(
    cells: tuple[int, int] = (2, 2),
    dates: int = 3,
    lon: float = -97.5,
    lat: float = 36.6,
    start: str = "2020-06-01",
    seed: int = 0,
    shape: tuple[int, int] | None = None,
    lake: bool = True,
) -> xr.Dataset:
    """The scene as an xarray Dataset on the EASE-2 50 m grid (EPSG:6933, pixel-centre coords).

    ``cells`` (rows, columns) of 9 km cells start at the cell holding (lon, lat); ``shape``
    (pixels) overrides them for small scenes. ``dates`` Sentinel-1 acquisitions 12 days apart
    from ``start``. Deterministic for ``seed``. Stages: the weather of each 9 km cell, the land
    surface at 50 m, the daily water balance, then per date the series and the backscatter.
    """
    import rioxarray  # noqa: F401  (registers .rio)

    if dates < 1:
        raise MsdaError(f"a scene needs at least one date, got {dates}")
    rng = np.random.default_rng(seed)
    row0, col0, (ny, nx) = scene_extent(cells, lon, lat, shape)
    rows, cols = np.arange(row0, row0 + ny), np.arange(col0, col0 + nx)
    x, _ = GRID_50M.center(np.zeros(nx, int), cols)
    _, y = GRID_50M.center(rows, np.zeros(ny, int))
    xx, yy = np.meshgrid(x, y)
    plon, plat = xy_to_lonlat(xx, yy)
    acq = pd.date_range(pd.Timestamp(start), periods=dates, freq=f"{S1_REPEAT_DAYS}D")
    days = pd.date_range(acq[0] - pd.Timedelta(days=HISTORY_DAYS + SPINUP_DAYS), acq[-1], freq="D")
    cell_of, precip, t_air = _scene_weather(rows, cols, days, rng)
    surface = _scene_surface(rng, plon, plat)
    keep = days >= acq[0] - pd.Timedelta(days=HISTORY_DAYS)
    params = SurfaceParams(physics.cosby_hydraulics(surface["sand"].ravel(), surface["clay"].ravel()),
                           surface["ndvi_min"].ravel(), surface["ndvi_max"].ravel(),
                           precip_scale=surface["precip_scale"].ravel())
    sm, ndvi, _ = water_and_greenness(precip, t_air, cell_of, plat.ravel(), days, params, keep=keep)
    # incidence angle: one per date at the far edge, 0.9 degrees less at the near edge of the scene
    angle_far = rng.uniform(31.0, 43.0, dates)
    across = (xx - xx.min()) / max(float(np.ptp(xx)), 1.0)
    lake_mask = np.zeros((ny, nx), bool)
    if lake:
        cy, cx = rng.uniform(0.25, 0.75) * ny, rng.uniform(0.25, 0.75) * nx
        yy_i, xx_i = np.ogrid[:ny, :nx]
        lake_mask = (yy_i - cy) ** 2 + (xx_i - cx) ** 2 <= (0.06 * min(ny, nx)) ** 2
    out, series = _acquisitions(rng, acq, days[keep], int(np.flatnonzero(keep)[0]), sm, ndvi, precip, t_air, cell_of,
                                angle_far, across, surface["rms_cm"], lake_mask)
    ds = _scene_dataset(out, series, surface, acq, x, y)
    ds.attrs.update(generator="msda.simulate.scene", seed=seed, lon=lon, lat=lat, start=str(acq[0].date()),
                    dates=dates, row0_50m=row0, col0_50m=col0)
    return ds.rio.write_crs(CRS)


def _scene_weather(rows: np.ndarray, cols: np.ndarray, days: pd.DatetimeIndex, rng: np.random.Generator):
    """The daily weather of each 9 km cell of the scene, and each pixel's cell."""
    k = GRID_9KM.ratio(GRID_50M)
    r9, c9 = rows // k, cols // k
    u_r, u_c = np.unique(r9), np.unique(c9)
    cell_r, cell_c = np.meshgrid(u_r, u_c, indexing="ij")
    clon, clat = GRID_9KM.rowcol_to_lonlat(cell_r.ravel(), cell_c.ravel())
    cell_of = (np.searchsorted(u_r, r9)[:, None] * len(u_c) + np.searchsorted(u_c, c9)[None, :]).ravel()
    precip, t_air = _weather(clon, clat, days, rng, np.ones(len(clon)))
    return cell_of, precip, t_air


def _scene_surface(rng: np.random.Generator, plon: np.ndarray, plat: np.ndarray) -> dict[str, np.ndarray]:
    """The land surface at 50 m: soil texture and density, terrain, roughness, where water
    gathers, the NDVI range."""
    shp = plon.shape
    west = float(np.mean(plon)) < -100
    sand = np.clip(45 + 10 * west + 12 * _field(rng, shp, 30) + 4 * _field(rng, shp, 3), 3, 92)
    clay = np.clip(22 + 6 * (float(np.mean(plon)) > -95) + 6 * _field(rng, shp, 30) + 2 * _field(rng, shp, 3), 2, 60)
    clay = np.minimum(clay, 97 - sand)
    bulk = np.clip(170 - 0.45 * clay - 0.1 * (100 - sand) + 4 * _field(rng, shp, 8), 105, 178)
    relief = float(np.clip(np.exp(-(((np.mean(plon) + 110) / 8) ** 2)) + 0.5 * np.exp(-(((np.mean(plon) + 81) / 3) ** 2)), 0.05, 1))
    local = 60 * _field(rng, shp, 60) + 15 * _field(rng, shp, 12) + 3 * _field(rng, shp, 3)
    elev = np.maximum(_elevation(plon, plat) + (1 + 4 * relief) * local, 0)
    dz_row, dz_col = np.gradient(elev, GRID_50M.cell_m)
    slope = np.clip(np.degrees(np.arctan(np.hypot(dz_row, dz_col))), 0, 40)
    # aspect: compass direction of the downslope vector (east = -dz/dx, north = +dz/drow)
    aspect = np.degrees(np.arctan2(-dz_col, dz_row)) % 360
    rms_cm = np.clip(1.4 + 0.4 * _field(rng, shp, 6), 0.5, 2.5)
    # hollows (below their surroundings) gather water, ridges shed it
    hollow = gaussian_filter(elev, 10) - elev
    precip_scale = np.clip(1 + 0.06 * _field(rng, shp, 40) + 0.15 * np.tanh(hollow / 10), 0.6, 1.4)
    annual = _climate(plon, plat)["precip_mm"]
    ndvi_max = np.clip(0.35 + 0.5 * np.clip(annual / 1300, 0, 1) + 0.05 * _field(rng, shp, 10), 0.25, 0.92)
    ndvi_min = np.clip(0.08 + 0.02 * _field(rng, shp, 10), 0.02, 0.2)
    return {"sand": sand, "clay": clay, "bulk": bulk, "elev": elev, "slope": slope, "aspect": aspect, "rms_cm": rms_cm,
            "precip_scale": precip_scale, "ndvi_max": ndvi_max, "ndvi_min": ndvi_min}


def _acquisitions(rng, acq, kept, w_first: int, sm, ndvi, precip, t_air, cell_of, angle_far, across, rms_cm,
                  lake_mask) -> tuple[dict, dict]:
    """Per date: the 46-step series before it, and VV, VH, angle and the true soil moisture (Oh
    under a Water Cloud, speckle), NaN over the lake."""
    shp = lake_mask.shape
    ny, nx = shp
    n_pix = ny * nx
    ndvi_cs = np.vstack([np.zeros((1, n_pix)), np.cumsum(ndvi, axis=0, dtype=np.float64)])
    cells_cs = {k: np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v[w_first:], axis=0)]) for k, v in
                (("t2m", t_air), ("tp", precip / 1000.0))}
    steps = np.arange(STEPS)
    dates = len(acq)
    out = {k: np.empty((dates, ny, nx), np.float32) for k in ("vv", "vh", "angle", "sm_true")}
    series = {k: np.empty((dates, STEPS, ny, nx), np.float32) for k in ("ndvi", "t2m", "tp")}
    for i, day in enumerate(acq):
        d = kept.get_loc(day)
        lo = d - HISTORY_DAYS + STEP_DAYS * steps  # window starts of the 46 steps (in kept days)
        series["ndvi"][i] = ((ndvi_cs[lo + STEP_DAYS] - ndvi_cs[lo]) / STEP_DAYS).reshape(STEPS, ny, nx)
        for k, cs in cells_cs.items():
            per_cell = (cs[lo + STEP_DAYS] - cs[lo]) / STEP_DAYS  # (46, cells)
            series[k][i] = per_cell[:, cell_of].reshape(STEPS, ny, nx)
        theta = sm[d].astype(float)
        angle = (angle_far[i] - 0.9 * (1 - across)).ravel()
        vv_s, vh_s = physics.oh_bare_soil(theta, angle, rms_cm.ravel())
        veg = ndvi[d].astype(float)
        vv = physics.water_cloud(vv_s, veg, angle, a=0.12, b=0.9) * rng.gamma(C.looks_50m, 1 / C.looks_50m, n_pix)
        vh = physics.water_cloud(vh_s, veg, angle, a=0.025, b=0.6) * rng.gamma(C.looks_50m, 1 / C.looks_50m, n_pix)
        out["vv"][i], out["vh"][i] = physics.db(vv).reshape(shp), physics.db(vh).reshape(shp)
        out["angle"][i] = angle.reshape(shp)
        out["sm_true"][i] = theta.reshape(shp)
        for k in ("vv", "vh", "angle", "sm_true"):
            out[k][i][lake_mask] = np.nan
    return out, series


def _scene_dataset(out: dict, series: dict, surface: dict, acq, x, y) -> xr.Dataset:
    dims3, dims4 = ("time", "y", "x"), ("time", "step", "y", "x")
    static = {"sand": surface["sand"] * 10, "clay": surface["clay"] * 10, "bulk_density": surface["bulk"],
              "elevation": surface["elev"], "slope": surface["slope"], "aspect_deg": surface["aspect"]}
    data = {k: (dims3, v) for k, v in out.items()}
    data.update({k: (("y", "x"), v.astype(np.float32)) for k, v in static.items()})
    data.update({k: (dims4, v) for k, v in series.items()})
    ds = xr.Dataset(data, coords={"time": acq, "step": np.arange(STEPS), "y": y, "x": x})
    units = {"vv": "dB", "vh": "dB", "angle": "deg", "sm_true": "m3/m3", "sand": "g/kg", "clay": "g/kg",
             "bulk_density": "cg/cm3", "elevation": "m", "slope": "deg", "aspect_deg": "deg", "ndvi": "1",
             "t2m": "degC", "tp": "m/d"}
    for k, u in units.items():
        ds[k].attrs["units"] = u
    return ds


def write_scene(ds: xr.Dataset, path: str | Path, force: bool = False) -> Path:
    """Write a scene atomically: a Zarr store (``.zarr``), a NetCDF file (``.nc``) or, for any
    other name, a folder of GeoTIFFs in the layout ``msda map`` reads."""
    from msda.io import atomic_path

    path = Path(path)
    with atomic_path(path, "scene", force=force) as tmp:
        if path.suffix == ".zarr":
            ds.to_zarr(tmp, mode="w", consolidated=False)
        elif path.suffix == ".nc":
            ds.to_netcdf(tmp, engine="netcdf4")
        else:
            tmp.mkdir()
            to_geotiffs(ds, tmp)
    return path


def to_geotiffs(ds: xr.Dataset, folder: str | Path) -> list[Path]:
    """One GeoTIFF per variable (static) or per variable and date (``<var>_<YYYY-MM-DD>.tif``);
    series as one band per step. Uses the dataset's CRS and pixel-centre coordinates."""
    import rasterio

    folder = Path(folder)
    x, y = ds["x"].to_numpy(), ds["y"].to_numpy()
    transform = GRID_50M.transform(*GRID_50M.rowcol(x[0], y[0]))
    written = []
    for name, da in ds.data_vars.items():
        if not {"y", "x"} <= set(da.dims):
            continue
        days = pd.DatetimeIndex(ds["time"].to_numpy()) if "time" in da.dims else [None]
        for t, day in enumerate(days):
            arr = da.isel(time=t) if day is not None else da
            arr = arr.transpose(*[d for d in ("step", "y", "x") if d in arr.dims]).to_numpy().astype(np.float32)
            arr = arr.reshape(-1, len(y), len(x))
            target = folder / (f"{name}_{day.date()}.tif" if day is not None else f"{name}.tif")
            with rasterio.open(target, "w", driver="GTiff", width=len(x), height=len(y), count=arr.shape[0],
                               dtype="float32", crs=CRS, transform=transform, nodata=np.nan, compress="deflate") as dst:
                dst.write(arr)
            written.append(target)
    return written
