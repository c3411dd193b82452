"""Per-site inputs from Google Earth Engine (optional: ``pip install msda[gee]``, an account).

Each function reduces a collection over the station's EASE-2 cell (area-weighted mean, GEE's
``Reducer.mean`` weights pixels by their overlap of the region) and returns a table in the
layout ``msda prepare samples`` takes:

- :func:`sentinel1`: network, station, date, vv, vh, angle (COPERNICUS/S1_GRD, IW, VV+VH, dB);
- :func:`daily_series`: network, station, date, ndvi (MOD13Q1 + MYD13Q1, scaled), t2m (degC) and
  tp (m/d) (ECMWF/ERA5_LAND/DAILY_AGGR);
- :func:`static_inputs`: sand, clay (g/kg), bulk_density (cg/cm3) at 0-5 cm (SoilGrids),
  elevation, slope, aspect_deg (SRTM 30 m).

The offline builders (``msda.prepare.samples``, ``msda.prepare.rasters``) are what the tests
run; this module's own logic (request sizes, unit conversions, table assembly) is tested against
a stand-in for the ``ee`` package.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from msda.grids import CRS, GRIDS
from msda.prepare.ismn import PrepareError

S1 = "COPERNICUS/S1_GRD"
NDVI = ("MODIS/061/MOD13Q1", "MODIS/061/MYD13Q1")
ERA5 = "ECMWF/ERA5_LAND/DAILY_AGGR"
SOIL = {"sand": ("projects/soilgrids-isric/sand_mean", "sand_0-5cm_mean"),
        "clay": ("projects/soilgrids-isric/clay_mean", "clay_0-5cm_mean"),
        "bulk_density": ("projects/soilgrids-isric/bdod_mean", "bdod_0-5cm_mean")}
SRTM = "USGS/SRTMGL1_003"


def _ee():
    try:
        import ee
    except ImportError:
        raise PrepareError("Earth Engine extraction needs the earthengine-api package: pip install 'msda[gee]'") from None
    return ee


def initialise(project: str | None = None) -> None:
    """``ee.Initialize`` with a clear error when the account is not set up."""
    ee = _ee()
    try:
        ee.Initialize(project=project)
    except Exception as exc:
        raise PrepareError(f"Earth Engine is not set up here ({exc}); run 'earthengine authenticate' first") from None


def cell_geometry(lon: float, lat: float, grid: str = "50m"):
    """The station's EASE-2 cell as an ee.Geometry (a rectangle in EPSG:6933)."""
    ee = _ee()
    g = GRIDS[grid]
    r, c = g.lonlat_to_rowcol(lon, lat)
    left, bottom, right, top = (float(v) for v in g.bounds(r, c))
    return ee.Geometry.Rectangle([left, bottom, right, top], ee.Projection(CRS), False)


def _series(collection, region, bands: list[str], scale: float) -> pd.DataFrame:
    """Mean of ``bands`` over ``region`` for every image: a frame with date and the bands."""
    ee = _ee()

    def reduce(image):
        values = image.reduceRegion(ee.Reducer.mean(), region, scale)
        return ee.Feature(None, values).set("millis", image.get("system:time_start"))

    info = collection.map(reduce).getInfo()
    rows = [{"millis": f["properties"].get("millis"), **{b: f["properties"].get(b) for b in bands}}
            for f in info.get("features", [])]
    frame = pd.DataFrame(rows, columns=["millis", *bands])
    frame["date"] = pd.to_datetime(frame["millis"], unit="ms").dt.normalize()
    return frame.drop(columns="millis").dropna(subset=bands, how="all")


def sentinel1(stations: pd.DataFrame, start: str, end: str, grid: str = "50m") -> pd.DataFrame:
    """Sentinel-1 IW GRD VV, VH (dB) and incidence angle over each station's cell."""
    ee = _ee()
    parts = []
    for _, st in stations.iterrows():
        region = cell_geometry(st["lon"], st["lat"], grid)
        col = (ee.ImageCollection(S1).filterBounds(region).filterDate(start, end)
               .filter(ee.Filter.eq("instrumentMode", "IW"))
               .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
               .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH"))
               .select(["VV", "VH", "angle"]))
        s = _series(col, region, ["VV", "VH", "angle"], 10).rename(columns={"VV": "vv", "VH": "vh"})
        parts.append(s.assign(network=st["network"], station=str(st["station"])))
    return _assemble(parts, ["vv", "vh", "angle"])


def daily_series(stations: pd.DataFrame, start: str, end: str, grid: str = "50m") -> pd.DataFrame:
    """NDVI (Terra + Aqua 16-day composites), ERA5-Land daily 2 m temperature and precipitation.

    ``start`` should lie 368 days before the first Sentinel-1 date (the series' history).
    """
    ee = _ee()
    parts = []
    for _, st in stations.iterrows():
        region = cell_geometry(st["lon"], st["lat"], grid)
        ndvi = ee.ImageCollection(NDVI[0]).merge(ee.ImageCollection(NDVI[1])).filterDate(start, end).select(["NDVI"])
        n = _series(ndvi, region, ["NDVI"], 250)
        n["ndvi"] = n.pop("NDVI") * 0.0001  # MODIS scale factor
        era = ee.ImageCollection(ERA5).filterDate(start, end).select(["temperature_2m", "total_precipitation_sum"])
        e = _series(era, region, ["temperature_2m", "total_precipitation_sum"], 11132)
        e["t2m"] = e.pop("temperature_2m") - 273.15  # K -> degC
        e["tp"] = e.pop("total_precipitation_sum")  # m per day
        both = e.merge(n.groupby("date", as_index=False)["ndvi"].mean(), on="date", how="outer")
        parts.append(both.assign(network=st["network"], station=str(st["station"])))
    return _assemble(parts, ["ndvi", "t2m", "tp"])


def static_inputs(stations: pd.DataFrame, grid: str = "50m") -> pd.DataFrame:
    """SoilGrids 0-5 cm sand, clay, bulk density and SRTM elevation, slope, aspect per station."""
    ee = _ee()
    dem = ee.Image(SRTM).select("elevation")
    terrain = ee.Image.cat([dem, ee.Terrain.slope(dem), ee.Terrain.aspect(dem).multiply(np.pi / 180).sin().rename("asin"),
                            ee.Terrain.aspect(dem).multiply(np.pi / 180).cos().rename("acos")])
    soil = ee.Image.cat([ee.Image(asset).select([band]).rename(name) for name, (asset, band) in SOIL.items()])
    rows = []
    for _, st in stations.iterrows():
        region = cell_geometry(st["lon"], st["lat"], grid)
        t = terrain.reduceRegion(ee.Reducer.mean(), region, 30).getInfo()
        s = soil.reduceRegion(ee.Reducer.mean(), region, 250).getInfo()
        rows.append({"network": st["network"], "station": str(st["station"]), "sand": s.get("sand"),
                     "clay": s.get("clay"), "bulk_density": s.get("bulk_density"), "elevation": t.get("elevation"),
                     "slope": t.get("slope"),
                     "aspect_deg": float(np.rad2deg(np.arctan2(t["asin"], t["acos"])) % 360)
                     if t.get("asin") is not None and t.get("acos") is not None else np.nan})
    return pd.DataFrame(rows)


def _assemble(parts: list[pd.DataFrame], cols: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=["network", "station", "date", *cols])
    frame = pd.concat(parts, ignore_index=True)
    return frame[["network", "station", "date", *cols]].sort_values(["network", "station", "date"]).reset_index(drop=True)


def default_period(first_s1: str, last_s1: str) -> tuple[str, str]:
    """The daily-series period for Sentinel-1 dates in [first, last]: 368 days of history."""
    start = dt.date.fromisoformat(first_s1) - dt.timedelta(days=369)
    return start.isoformat(), (dt.date.fromisoformat(last_s1) + dt.timedelta(days=1)).isoformat()
