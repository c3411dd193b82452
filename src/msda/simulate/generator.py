"""A physically based synthetic CONUS benchmark in the sample layout of METHOD.md section 3.

Seven networks placed like the real ones (Table 2 counts), a stochastic weather generator with
a dry-west / wet-east gradient, smooth land-surface fields with 50 m heterogeneity, NDVI driven
by temperature and water, a 0-5 cm bucket model per 50 m cell, SMAP-like 9 km retrievals and
Sentinel-1 backscatter from the Oh model under a Water Cloud. Equations and parameter sources:
docs/simulate.md. Nothing here is tuned to favour any transfer method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from msda.errors import MsdaError
from msda.grids import GRID_9KM, GRID_50M, lonlat_to_xy, xy_to_lonlat
from msda.schema import DEFAULT_SCHEMA
from msda.simulate import physics
from msda.tables import Samples, samples_from_frame

STEPS, STEP_DAYS = 46, 8
HISTORY_DAYS = STEPS * STEP_DAYS  # 368 days of 8-day series before each acquisition
SPINUP_DAYS = 120
SUBCELLS = 8  # 50 m cells sampled inside each 9 km cell (besides the stations' own)
LOOKS_50M = 4.4 * 25  # equivalent looks of a 50 m Sentinel-1 cell as generated


@dataclass(frozen=True)
class NetworkSpec:
    """A network of METHOD.md Table 2: counts and where its stations lie."""

    stations: int
    fine_samples: int
    coarse_samples: int
    region: tuple[float, float, float, float] | None = None  # lon0, lon1, lat0, lat1
    clusters: tuple[tuple[float, float], ...] = ()
    cluster_radius_deg: float = 0.3


NETWORKS: dict[str, NetworkSpec] = {
    "ARM": NetworkSpec(17, 4055, 4396, clusters=((-97.5, 36.6),), cluster_radius_deg=1.2),
    "FLUXNET-AMERIFLUX": NetworkSpec(5, 875, 2947, clusters=((-89.0, 40.0), (-105.5, 40.0), (-110.0, 31.8)), cluster_radius_deg=1.0),
    "iRON": NetworkSpec(9, 1263, 2183, clusters=((-116.75, 43.15),), cluster_radius_deg=0.35),
    "PBO_H2O": NetworkSpec(134, 6398, 49498, region=(-124.5, -104.0, 31.0, 49.0)),
    "SCAN": NetworkSpec(187, 33542, 50782, region=(-124.5, -67.0, 25.0, 49.0)),
    "SOILSCAPE": NetworkSpec(25, 245, 3476, clusters=((-120.9, 38.4), (-110.9, 31.7), (-122.0, 40.5)), cluster_radius_deg=0.5),
    "USCRN": NetworkSpec(103, 20169, 26014, region=(-124.5, -67.0, 25.0, 49.0)),
}


@dataclass
class SimConfig:
    """Settings of one generated benchmark (recorded beside the tables)."""

    scale: float = 1.0
    seed: int = 0
    start: str = "2016-01-01"  # Sentinel-1 sampling period
    end: str = "2021-12-31"
    networks: tuple[str, ...] = tuple(NETWORKS)
    pretrain_cells: int = 400
    pretrain_samples_per_cell: int = 250

    def check(self) -> None:
        if not self.scale > 0:
            raise MsdaError(f"--scale must be > 0, got {self.scale}")
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown:
            raise MsdaError(f"unknown network(s) {unknown}; known: {sorted(NETWORKS)}")
        if not self.networks:
            raise MsdaError("no networks selected")
        try:
            s, e = pd.Timestamp(self.start), pd.Timestamp(self.end)
        except ValueError as exc:
            raise MsdaError(f"bad date: {exc}") from None
        if e - s < pd.Timedelta(days=12):
            raise MsdaError(f"empty date range: {self.start} to {self.end} holds no 12-day Sentinel-1 cycle")


@dataclass
class Benchmark:
    fine: Samples
    coarse: Samples
    pretrain: Samples
    stations: pd.DataFrame
    config: SimConfig
    series: dict[str, pd.DataFrame] = field(default_factory=dict)  # daily series for plots
    diagnostics: dict[str, object] = field(default_factory=dict)  # what only the generator sees (validation)


# A coarse outline of the conterminous US (lon, lat): stations and cells fall on land
CONUS_OUTLINE = (
    (-124.7, 48.4), (-123.0, 49.0), (-95.2, 49.0), (-89.6, 48.0), (-84.8, 46.5), (-82.4, 45.3), (-82.5, 42.0),
    (-79.0, 42.9), (-76.0, 44.0), (-74.7, 45.0), (-71.5, 45.0), (-69.2, 47.4), (-67.0, 44.8), (-70.0, 41.8),
    (-74.0, 40.5), (-76.0, 37.0), (-75.5, 35.2), (-81.0, 31.5), (-80.0, 27.0), (-80.4, 25.2), (-81.8, 26.5),
    (-83.0, 29.5), (-85.0, 29.7), (-89.5, 30.2), (-89.5, 29.0), (-94.0, 29.5), (-97.2, 27.8), (-97.4, 25.9),
    (-99.5, 27.5), (-101.4, 29.8), (-103.0, 29.0), (-104.7, 29.9), (-106.5, 31.8), (-108.2, 31.8), (-111.0, 31.3),
    (-114.8, 32.5), (-117.1, 32.5), (-118.5, 34.0), (-120.6, 34.6), (-122.5, 37.5), (-124.2, 40.3), (-124.5, 43.0),
)


def _uniform_on_land(rng: np.random.Generator, n: int, box: tuple[float, float, float, float]):
    """n points uniform over the part of a lon/lat box inside the CONUS outline (rejection)."""
    from matplotlib.path import Path as Polygon

    outline = Polygon(CONUS_OUTLINE)
    lon0, lon1, lat0, lat1 = box
    lons, lats = np.empty(0), np.empty(0)
    while len(lons) < n:
        lo, la = rng.uniform(lon0, lon1, 4 * n), rng.uniform(lat0, lat1, 4 * n)
        inside = outline.contains_points(np.column_stack([lo, la]))
        lons, lats = np.concatenate([lons, lo[inside]]), np.concatenate([lats, la[inside]])
    return lons[:n], lats[:n]


# ----- smooth fields over CONUS ---------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, n_waves: int = 6):
    """A random smooth field of lon/lat in [-1, 1] (sum of a few plane waves)."""
    k = rng.uniform(0.02, 0.12, (n_waves, 2)) * rng.choice([-1, 1], (n_waves, 2))
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    amp = rng.uniform(0.5, 1.0, n_waves)

    def f(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        z = sum(a * np.sin(kk[0] * lon * 2 * np.pi / 10 + kk[1] * lat * 2 * np.pi / 10 * 3 + p) for a, kk, p in zip(amp, k, phase))
        return z / amp.sum()

    return f


def _climate(lon: np.ndarray, lat: np.ndarray) -> dict[str, np.ndarray]:
    """Mean climate: annual precipitation (mm), temperature mean and amplitude (degC)."""
    west_east = np.clip((lon + 125.0) / 58.0, 0, 1)
    precip = 250.0 + 1050.0 * west_east**1.5 + 500.0 * np.exp(-(((lon + 123.5) / 1.5) ** 2)) * (lat > 40)
    t_mean = 24.0 - 0.75 * (lat - 25.0)
    t_amp = 7.0 + 0.35 * (lat - 25.0) + 3.0 * (1 - west_east)
    return {"precip_mm": precip, "t_mean": t_mean, "t_amp": t_amp}


def _elevation(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    rockies = 2300.0 * np.exp(-(((lon + 109.0) / 6.0) ** 2))
    sierra = 1200.0 * np.exp(-(((lon + 119.5) / 1.5) ** 2))
    appalachia = 600.0 * np.exp(-(((lon + 81.0) / 2.5) ** 2)) * (lat > 33)
    plains = 1200.0 * np.clip((-lon - 95.0) / 10.0, 0, 1) * (lon > -105)
    return 100.0 + rockies + sierra + appalachia + plains


# ----- the generator --------------------------------------------------------------------------
def _place_stations(cfg: SimConfig, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for net in cfg.networks:
        spec = NETWORKS[net]
        n = max(1, int(round(spec.stations * cfg.scale)))
        if spec.region is not None:
            land = _uniform_on_land(rng, n, spec.region)
        for i in range(n):
            if spec.region is not None:
                lon, lat = land[0][i], land[1][i]
            else:
                clon, clat = spec.clusters[i % len(spec.clusters)]
                r = spec.cluster_radius_deg * np.sqrt(rng.uniform())
                a = rng.uniform(0, 2 * np.pi)
                lon, lat = clon + r * np.cos(a), clat + r * np.sin(a)
            rows.append((net, f"{net}_{i + 1:03d}", lon, lat))
    st = pd.DataFrame(rows, columns=["network", "station", "lon", "lat"])
    x, y = lonlat_to_xy(st["lon"].to_numpy(), st["lat"].to_numpy())
    st["r"], st["c"] = GRID_9KM.rowcol(x, y)
    st["row_50m"], st["col_50m"] = GRID_50M.rowcol(x, y)
    return st


def _pretrain_cells(cfg: SimConfig, rng: np.random.Generator) -> pd.DataFrame:
    n = max(4, int(round(cfg.pretrain_cells * cfg.scale)))
    lon, lat = _uniform_on_land(rng, n, (-124.5, -67.0, 25.0, 49.0))
    x, y = lonlat_to_xy(lon, lat)
    r, c = GRID_9KM.rowcol(x, y)
    cells = pd.DataFrame({"lon": lon, "lat": lat, "r": r, "c": c}).drop_duplicates(["r", "c"]).reset_index(drop=True)
    return cells


def _weather(lon: np.ndarray, lat: np.ndarray, days: pd.DatetimeIndex, rng: np.random.Generator, wetness: np.ndarray):
    """Daily precipitation (mm) and 2 m air temperature (degC) per cell (Richardson-type generator).

    Occurrence: two-state Markov chain; amounts: gamma (shape 0.75); temperature: seasonal cycle
    plus an AR(1) anomaly (lag-1 correlation 0.7, 3 degC), cooler on wet days.
    """
    n_cells, n_days = len(lon), len(days)
    clim = _climate(lon, lat)
    annual = clim["precip_mm"] * wetness
    doy = days.day_of_year.to_numpy()
    season = 1.0 + 0.35 * np.cos(2 * np.pi * (doy[:, None] - 150) / 365.0) * np.where(lon < -110, -1.0, 1.0)[None, :]
    wet_frac = np.clip(0.12 + 0.22 * (annual / 1300.0), 0.08, 0.45)
    p11 = 0.45 + 0.2 * wet_frac
    p01 = wet_frac * (1 - p11) / (1 - wet_frac)
    shape = 0.75
    mean_wet = annual / 365.0 / wet_frac  # mm per wet day
    precip = np.zeros((n_days, n_cells))
    t_air = np.zeros((n_days, n_cells))
    wet = rng.uniform(size=n_cells) < wet_frac
    anom = np.zeros(n_cells)
    u_occ = rng.uniform(size=(n_days, n_cells))
    amounts = rng.gamma(shape, 1.0 / shape, size=(n_days, n_cells))
    shocks = rng.normal(0, 3.0 * np.sqrt(1 - 0.7**2), size=(n_days, n_cells))
    for d in range(n_days):
        p = np.where(wet, p11, p01) * np.clip(season[d], 0.3, 2.0)
        wet = u_occ[d] < np.clip(p, 0, 0.95)
        precip[d] = np.where(wet, amounts[d] * mean_wet * season[d], 0.0)
        anom = 0.7 * anom + shocks[d]
        t_air[d] = clim["t_mean"] - clim["t_amp"] * np.cos(2 * np.pi * (doy[d] - 15) / 365.0) + anom - 1.5 * wet
    return precip, t_air


def _s1_dates(n_cells: int, days: pd.DatetimeIndex, first: int, rng: np.random.Generator, passes: np.ndarray):
    """Sentinel-1 acquisition day indices and incidence angles per cell (12-day cycle, several passes)."""
    out = []
    for j in range(n_cells):
        offsets = rng.choice(12, size=passes[j], replace=False)
        angles = rng.uniform(30.5, 45.5, size=passes[j])
        idx, ang = [], []
        for o, a in zip(offsets, angles):
            d = np.arange(first + o, len(days), 12)
            idx.append(d)
            ang.append(np.full(len(d), a))
        idx, ang = np.concatenate(idx), np.concatenate(ang)
        order = np.argsort(idx)
        out.append((idx[order], ang[order]))
    return out


def _eight_day_series(daily: np.ndarray, col: np.ndarray, day: np.ndarray) -> np.ndarray:
    """(n, 46) means of 8-day steps over the 368 days before ``day`` for columns ``col``."""
    cs = np.vstack([np.zeros((1, daily.shape[1])), np.cumsum(daily, axis=0)])
    starts = day[:, None] - HISTORY_DAYS + STEP_DAYS * np.arange(STEPS)[None, :]
    c = col[:, None]
    return (cs[starts + STEP_DAYS, c] - cs[starts, c]) / STEP_DAYS


def water_and_greenness(
    precip: np.ndarray,
    t_air: np.ndarray,
    cell_of: np.ndarray,
    lat: np.ndarray,
    days: pd.DatetimeIndex,
    hyd: dict[str, np.ndarray],
    ndvi_min: np.ndarray,
    ndvi_max: np.ndarray,
    precip_scale: np.ndarray | float = 1.0,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Daily 0-5 cm soil moisture and NDVI of 50 m cells, (kept days, cells) float32 each.

    ``precip``/``t_air`` are (days, weather cells); ``cell_of`` maps each 50 m cell to its weather
    cell. Bucket model with Hamon PET; plant-available water integrates over ~a month and
    greenness follows it with ~2 weeks lag (warm enough: logistic in air temperature).
    ``keep`` (bool per day) stores only those days.
    """
    doy = days.day_of_year.to_numpy()
    keep = np.ones(len(days), bool) if keep is None else np.asarray(keep, bool)
    n = len(cell_of)
    theta = 0.5 * (hyd["field_capacity"] + hyd["wilting_point"])
    sm = np.empty((int(keep.sum()), n), dtype=np.float32)
    ndvi = np.empty_like(sm)
    avail, green = np.zeros(n), np.zeros(n)
    k = 0
    for d in range(len(days)):
        t = t_air[d, cell_of]
        pet = physics.hamon_pet(t, physics.day_length_hours(lat, doy[d]))
        theta = physics.bucket_step(theta, precip[d, cell_of] * precip_scale, pet, hyd)
        rel = np.clip((theta - hyd["wilting_point"]) / (hyd["field_capacity"] - hyd["wilting_point"]), 0, 1)
        avail += (rel - avail) / 30.0
        f_t = 1.0 / (1.0 + np.exp(-(t - 10.0) / 3.0))
        green += (f_t * np.sqrt(avail) - green) / 15.0
        if keep[d]:
            sm[k] = theta
            ndvi[k] = ndvi_min + (ndvi_max - ndvi_min) * green
            k += 1
    return sm, ndvi


def _split_total(total: int, n: int, caps: np.ndarray, rng: np.random.Generator, minimum: int = 6) -> np.ndarray:
    """Integers >= minimum, <= caps, summing to ``total`` where the caps allow, with spread."""
    w = rng.gamma(2.0, 1.0, n)
    k = np.maximum(minimum, np.floor(w / w.sum() * total)).astype(int)
    k = np.minimum(k, caps)
    for _ in range(50):
        diff = total - k.sum()
        if diff == 0:
            break
        room = (caps - k) if diff > 0 else (k - minimum)
        can = np.flatnonzero(room > 0)
        if len(can) == 0:
            break
        step = np.sign(diff) * np.minimum(room[can], max(1, abs(diff) // len(can) + 1))
        take = np.cumsum(np.abs(step)) <= abs(diff)
        take[0] = True
        k[can[take]] += step[take].astype(int)
    return k


def simulate(cfg: SimConfig | None = None) -> Benchmark:
    """Generate the fine, coarse and pretraining tables (deterministic for ``cfg.seed``)."""
    cfg = cfg or SimConfig()
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    start, end = pd.Timestamp(cfg.start), pd.Timestamp(cfg.end)
    days = pd.date_range(start - pd.Timedelta(days=HISTORY_DAYS + SPINUP_DAYS), end, freq="D")
    first = HISTORY_DAYS + SPINUP_DAYS

    stations = _place_stations(cfg, rng)
    pre = _pretrain_cells(cfg, rng)
    # 9 km cells: station cells first, then pretraining cells
    st_cells = stations[["r", "c"]].drop_duplicates().reset_index(drop=True)
    cells = pd.concat([st_cells.assign(kind="station"), pre[["r", "c"]].assign(kind="pretrain")], ignore_index=True)
    cells = cells.drop_duplicates(["r", "c"]).reset_index(drop=True)
    cx, cy = GRID_9KM.center(cells["r"].to_numpy(), cells["c"].to_numpy())
    cells["lon"], cells["lat"] = xy_to_lonlat(cx, cy)
    n_cells = len(cells)
    is_pre = (cells["kind"] == "pretrain").to_numpy()
    # pretraining cells are more varied: wider spread of the climate (standing for global data)
    wetness = np.exp(rng.normal(0, np.where(is_pre, 0.35, 0.12)))
    precip, t_air = _weather(cells["lon"].to_numpy(), cells["lat"].to_numpy(), days, rng, wetness)

    # ----- land surface: 9 km means and 50 m sub-cells (SUBCELLS random + each station's) ----
    sand_f, clay_f = _smooth_field(rng), _smooth_field(rng)
    lon_c, lat_c = cells["lon"].to_numpy(), cells["lat"].to_numpy()
    sand_c = np.clip(45 + 22 * sand_f(lon_c, lat_c) + 10 * (lon_c < -100), 8, 85)
    clay_c = np.clip(22 + 12 * clay_f(lon_c, lat_c) + 6 * (lon_c > -95), 5, 50)
    elev_c = _elevation(lon_c, lat_c) + rng.normal(0, 60, n_cells)
    relief = np.clip(np.exp(-(((lon_c + 110) / 8) ** 2)) + 0.5 * np.exp(-(((lon_c + 81) / 3) ** 2)), 0.05, 1)

    cell_of = {(r, c): i for i, (r, c) in enumerate(zip(cells["r"], cells["c"]))}
    st_cell = np.array([cell_of[(r, c)] for r, c in zip(stations["r"], stations["c"])], dtype=int)
    sub_cell = np.concatenate([np.repeat(np.arange(n_cells), SUBCELLS), st_cell])
    n_sub = len(sub_cell)
    station_sub = n_cells * SUBCELLS + np.arange(len(stations))
    sand = np.clip(sand_c[sub_cell] + rng.normal(0, 8, n_sub), 3, 92)
    clay = np.clip(clay_c[sub_cell] + rng.normal(0, 5, n_sub), 2, 60)
    clay = np.minimum(clay, 97 - sand)
    bulk = np.clip(170 - 0.45 * clay - 0.1 * (100 - sand) + rng.normal(0, 6, n_sub), 105, 178)
    elev = np.maximum(elev_c[sub_cell] + rng.normal(0, 40 * relief[sub_cell] + 5, n_sub), 0)
    slope = np.clip(rng.gamma(1.5, 1.0 + 8.0 * relief[sub_cell]), 0, 40)
    aspect = rng.uniform(0, 360, n_sub)
    rms_cm = rng.uniform(0.6, 2.2, n_sub)
    hyd = physics.cosby_hydraulics(sand, clay)

    # ----- daily water balance and NDVI per 50 m cell --------------------------------------
    ndvi_max = np.clip(0.35 + 0.5 * np.clip(wetness[sub_cell] * _climate(lon_c, lat_c)["precip_mm"][sub_cell] / 1300, 0, 1)
                       + rng.normal(0, 0.05, n_sub), 0.25, 0.92)
    ndvi_min = np.clip(0.08 + rng.normal(0, 0.02, n_sub), 0.02, 0.2)
    sm, ndvi = water_and_greenness(precip, t_air, sub_cell, lat_c[sub_cell], days, hyd, ndvi_min, ndvi_max)

    # ----- Sentinel-1 calendar, SMAP availability ----------------------------------------
    n_years = (len(days) - first) / 365.25
    fine_target = {n: NETWORKS[n].fine_samples * (stations["network"] == n).sum() / NETWORKS[n].stations for n in cfg.networks}
    coarse_target = {n: NETWORKS[n].coarse_samples * (stations["network"] == n).sum() / NETWORKS[n].stations for n in cfg.networks}
    first_station = stations.drop_duplicates(["r", "c"])  # a 9 km cell is named after its first station
    first_net = first_station.set_index(["r", "c"])["network"]
    cells_per_net = first_net.value_counts()
    passes = np.full(n_cells, 2)
    for i in range(len(st_cells)):
        net = first_net.loc[(cells.at[i, "r"], cells.at[i, "c"])]
        per_cell = coarse_target[net] / cells_per_net[net]
        passes[i] = int(np.clip(np.ceil(per_cell * 1.6 / (n_years * 365.25 / 12)), 2, 8))
    pre_per_cell = max(1, int(cfg.pretrain_samples_per_cell))
    passes[is_pre] = int(np.clip(np.ceil(pre_per_cell * 1.6 / (n_years * 365.25 / 12)), 2, 8))
    s1 = _s1_dates(n_cells, days, first, rng, passes)
    smap_am = rng.uniform(size=(len(days), n_cells)) < 0.55
    smap_pm = rng.uniform(size=(len(days), n_cells)) < 0.55

    # SMAP-like 9 km soil moisture: footprint mean, ~2-day smoothing, cell bias, noise, AM/PM
    def footprint_mean(daily: np.ndarray) -> np.ndarray:
        """(days, cells): mean over each 9 km cell's SUBCELLS 50 m cells (stored cell by cell)."""
        return daily[:, : n_cells * SUBCELLS].reshape(len(days), n_cells, SUBCELLS).mean(2, dtype=np.float64)

    cell_mean = footprint_mean(sm)
    smooth = cell_mean.copy()
    for d in range(1, len(days)):
        smooth[d] = 0.6 * cell_mean[d] + 0.4 * smooth[d - 1]
    bias = rng.normal(0.0, 0.03, n_cells)
    pm_bias = rng.normal(0.015, 0.01, n_cells)
    am = smooth + bias + rng.normal(0, 0.025, smooth.shape)
    pm = smooth + bias + pm_bias + rng.normal(0, 0.025, smooth.shape)
    am[~smap_am], pm[~smap_pm] = np.nan, np.nan
    pm_corrected = pm - (np.nanmean(pm, axis=0) - np.nanmean(am, axis=0))  # PM to AM by mean difference
    n_obs = (~np.isnan(am)).astype(int) + (~np.isnan(pm_corrected))
    total = np.nan_to_num(am) + np.nan_to_num(pm_corrected)
    with np.errstate(invalid="ignore", divide="ignore"):
        smap = np.where(n_obs > 0, np.clip(total / n_obs, 0.02, 0.6), np.nan)

    # ----- samples -------------------------------------------------------------------------
    def sar(sub: np.ndarray, d: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        veg = ndvi[d, sub]
        vv_s, vh_s = physics.oh_bare_soil(sm[d, sub].astype(float), angle, rms_cm[sub])
        vv = physics.water_cloud(vv_s, veg, angle, a=0.12, b=0.9)
        vh = physics.water_cloud(vh_s, veg, angle, a=0.025, b=0.6)
        return vv, vh

    def speckle(n: int, looks: float) -> np.ndarray:
        return rng.gamma(looks, 1.0 / looks, n)

    def features(cell: np.ndarray, d: np.ndarray, angle: np.ndarray, vv: np.ndarray,
                 vh: np.ndarray, soil: dict[str, np.ndarray], ndvi_daily: np.ndarray, ndvi_col: np.ndarray) -> pd.DataFrame:
        raw = {
            "vv": physics.db(vv), "vh": physics.db(vh), "angle": angle, "doy": days[d].day_of_year.to_numpy().astype(float),
            **soil,
            "row_9km": cells["r"].to_numpy()[cell].astype(float), "col_9km": cells["c"].to_numpy()[cell].astype(float),
        }
        frame = pd.DataFrame(raw)
        series = {
            "ndvi": _eight_day_series(ndvi_daily, ndvi_col, d),
            "t2m": _eight_day_series(t_air, cell, d),
            "tp": _eight_day_series(precip, cell, d) / 1000.0,
        }
        cols = {f"{k}_{i:02d}": v[:, i] for k, v in series.items() for i in range(STEPS)}
        frame = pd.concat([frame, pd.DataFrame(cols)], axis=1)
        f = DEFAULT_SCHEMA.encode(frame)
        return pd.DataFrame(DEFAULT_SCHEMA.normalise(f), columns=DEFAULT_SCHEMA.feature_names)

    lc_code = np.where(ndvi_max > 0.75, 4, np.where(ndvi_max > 0.6, 12, np.where(ndvi_max > 0.45, 10, 7)))

    # fine: each station's own 50 m cell, on Sentinel-1 dates of its record
    caps = np.array([len(s1[j][0]) for j in st_cell])
    if caps.min() <= 5:
        i = int(np.argmin(caps))
        raise MsdaError(
            f"date range {cfg.start} to {cfg.end} too short: station {stations.at[i, 'station']} gets "
            f"{caps[i]} Sentinel-1 dates, and stations need more than 5"
        )
    k_station = np.zeros(len(stations), dtype=int)
    for net in cfg.networks:
        idx = np.flatnonzero(stations["network"].to_numpy() == net)
        k_station[idx] = _split_total(int(round(fine_target[net])), len(idx), caps[idx], rng)
    rows_st, rows_d, rows_a = [], [], []
    for i in range(len(stations)):
        dates, angles = s1[st_cell[i]]
        k = k_station[i]
        s0 = rng.integers(0, len(dates) - k + 1)  # the station's record: k consecutive acquisitions
        rows_st.append(np.full(k, i))
        rows_d.append(dates[s0 : s0 + k])
        rows_a.append(angles[s0 : s0 + k])
    si, sd, sa = np.concatenate(rows_st), np.concatenate(rows_d), np.concatenate(rows_a)
    sub = station_sub[si]
    vv, vh = sar(sub, sd, sa)
    looks_50m = LOOKS_50M
    vv, vh = vv * speckle(len(sub), looks_50m), vh * speckle(len(sub), looks_50m)
    soil = {"sand": sand[sub] * 10, "clay": clay[sub] * 10, "bulk_density": bulk[sub], "elevation": elev[sub],
            "slope": slope[sub], "aspect_deg": aspect[sub]}
    feats = features(st_cell[si], sd, sa, vv, vh, soil, ndvi, sub)
    offset = rng.normal(0, 0.02, len(stations))  # sensor calibration / representativeness, per station
    truth = sm[sd, sub] + offset[si] + rng.normal(0, 0.01, len(sub))
    truth = np.clip(truth, 0.01, hyd["porosity"][sub])
    ids = pd.DataFrame({
        "network": stations["network"].to_numpy()[si], "station": stations["station"].to_numpy()[si],
        "r": stations["r"].to_numpy()[si], "c": stations["c"].to_numpy()[si], "date": days[sd],
        "lc": lc_code[sub], "sm_m3m3": truth,
    })
    fine_frame = pd.concat([ids, feats], axis=1)

    # 9 km: footprint means on Sentinel-1 dates with a SMAP retrieval
    ndvi_cell = footprint_mean(ndvi)

    def coarse_rows(cell_idx: np.ndarray, counts: np.ndarray, name_of: list[tuple[str, str]]) -> pd.DataFrame:
        ci, di, ai = [], [], []
        for j, k in zip(cell_idx, counts):
            dates, angles = s1[j]
            ok = ~np.isnan(smap[dates, j])
            dates, angles = dates[ok], angles[ok]
            k = min(k, len(dates))
            s0 = rng.integers(0, len(dates) - k + 1)
            ci.append(np.full(k, j))
            di.append(dates[s0 : s0 + k])
            ai.append(angles[s0 : s0 + k])
        ci, di, ai = np.concatenate(ci), np.concatenate(di), np.concatenate(ai)
        # sigma0 of the footprint: mean of the sub-cells' linear sigma0 (speckle averages out)
        subs = ci[:, None] * SUBCELLS + np.arange(SUBCELLS)[None, :]
        vv_sub, vh_sub = sar(subs.ravel(), np.repeat(di, SUBCELLS), np.repeat(ai, SUBCELLS))
        vv = vv_sub.reshape(-1, SUBCELLS).mean(1) * speckle(len(ci), 4.4 * 810_000)
        vh = vh_sub.reshape(-1, SUBCELLS).mean(1) * speckle(len(ci), 4.4 * 810_000)
        soil = {"sand": sand_c[ci] * 10, "clay": clay_c[ci] * 10,
                "bulk_density": bulk[subs].mean(1), "elevation": elev[subs].mean(1), "slope": slope[subs].mean(1),
                "aspect_deg": np.degrees(np.arctan2(np.sin(np.radians(aspect[subs])).mean(1), np.cos(np.radians(aspect[subs])).mean(1))) % 360}
        feats = features(ci, di, ai, vv, vh, soil, ndvi_cell, ci)
        ids = pd.DataFrame({
            "network": [name_of[j][0] for j in ci], "station": [name_of[j][1] for j in ci],
            "r": cells["r"].to_numpy()[ci], "c": cells["c"].to_numpy()[ci], "date": days[di],
            "lc": lc_code[ci * SUBCELLS], "sm_m3m3": smap[di, ci],
        })
        return pd.concat([ids, feats], axis=1)

    names: list[tuple[str, str]] = [("PRETRAIN", f"cell_{r}_{c}") for r, c in zip(cells["r"], cells["c"])]
    for _, row in first_station.iterrows():
        names[cell_of[(row["r"], row["c"])]] = (row["network"], row["station"])
    st_cell_idx = np.arange(len(st_cells))
    counts = np.zeros(len(st_cells), dtype=int)
    cap9 = np.array([int((~np.isnan(smap[s1[j][0], j])).sum()) for j in st_cell_idx])
    nets_of_cell = np.array([names[j][0] for j in st_cell_idx])
    for net in cfg.networks:
        idx = np.flatnonzero(nets_of_cell == net)
        counts[idx] = _split_total(int(round(coarse_target[net])), len(idx), cap9[idx], rng)
    coarse_frame = coarse_rows(st_cell_idx, counts, names)
    pre_idx = np.flatnonzero(is_pre)
    pretrain_frame = coarse_rows(pre_idx, np.full(len(pre_idx), pre_per_cell), names)

    fine = samples_from_frame(fine_frame, "fine")
    coarse = samples_from_frame(coarse_frame, "coarse")
    pretrain = samples_from_frame(pretrain_frame, "coarse")
    # daily series of the first SCAN (or first) station, for the plots
    i0 = int(np.flatnonzero(stations["network"].to_numpy() == ("SCAN" if "SCAN" in cfg.networks else cfg.networks[0]))[0])
    j0 = st_cell[i0]
    series = {"station": pd.DataFrame({
        "date": days[first:], "sm_50m": sm[first:, station_sub[i0]], "sm_9km_true": cell_mean[first:, j0],
        "smap": smap[first:, j0], "precip_mm": precip[first:, j0], "ndvi": ndvi[first:, station_sub[i0]],
    }).assign(station=stations.at[i0, "station"])}
    stations = stations.assign(sand_pct=sand[station_sub], clay_pct=clay[station_sub], porosity=hyd["porosity"][station_sub],
                               annual_precip_mm=precip[first:, st_cell].sum(0) / n_years)
    inside = sm[first:, : n_cells * SUBCELLS].reshape(len(days) - first, n_cells, SUBCELLS)
    diagnostics = {
        "within_cell_sd": inside.std(axis=2, ddof=1).mean(axis=0),  # per 9 km cell, mean over days
        "station_sm_50m": sm[first:, station_sub],  # (days, stations): each station's 50 m cell
        "station_sm_9km": cell_mean[first:, st_cell],  # (days, stations): its 9 km footprint mean
        "looks_50m": LOOKS_50M,
    }
    return Benchmark(fine, coarse, pretrain, stations, cfg, series, diagnostics)
