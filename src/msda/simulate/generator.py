"""A physically based synthetic CONUS benchmark in the sample layout of METHOD.md section 3.

Seven networks placed like the real ones (Table 2 counts), a stochastic weather generator with
a dry-west / wet-east gradient and rain that varies below 9 km, land-cover mixtures inside each
9 km cell, soil texture with 50 m heterogeneity (inputs with SoilGrids-like error), terrain
wetness and irrigation, NDVI by class, a 0-5 cm bucket model per 50 m cell, probes with their own
representativeness and calibration, SMAP-like 9 km retrievals over a ~35 km footprint with
vegetation-dependent errors, and Sentinel-1 backscatter from the Oh model under a Water Cloud.
Equations and parameter sources: docs/simulate.md. Nothing here is tuned to favour any transfer
method: parameters come from the literature and the validation of simulate/validate.py.
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


@dataclass(frozen=True)
class Constants:
    """The generator's fixed parameters (each one's source: docs/simulate.md)."""

    inner: int = 12  # 50 m cells sampled inside each 9 km cell: its inputs are their area means
    footprint: int = 12  # 50 m cells sampled from each 9 km cell's SMAP footprint
    smap_footprint_km: float = 35.0  # full width at half maximum of the enhanced product's footprint
    sensing_depth_mm: float = 25.0  # the top layer L- and C-band see, against the 5 cm of the probes
    smap_dry_bias: tuple[float, float] = (0.005, 0.006)  # m3/m3: a + b VWC (kg/m2), subtracted
    smap_noise: tuple[float, float] = (0.02, 0.008)  # m3/m3: SD a + b VWC
    looks_50m: float = 4.4 * 2500 / (20 * 22)  # ENL 4.4 per GRD resolution cell of ~20 x 22 m: 25 at 50 m
    clutter_db: float = 1.0  # static per-pixel backscatter of what no model holds (fences, trees, tracks)
    representativeness: tuple[float, float] = (0.95, 0.02)  # the probe's point against its 50 m cell: AR(1) lag-1, SD
    # per probe (Seyfried et al. 2005; Vaz et al. 2013)
    calibration: dict[str, float] = field(default_factory=lambda: {"gain_per_clay": 0.01, "gain_sd": 0.2, "offset_sd": 0.04})
    sensor_noise: float = 0.005
    station_on_grass: float = 0.65  # the rest on cropland
    # SD per cell, per pixel
    soilgrids_error: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"sand": (6.0, 10.0), "clay": (4.0, 7.0), "bulk_density": (0.0, 8.0)})
    twi_mean: float = 8.0
    # m3/m3 per % organic matter (the order of Rawls et al. 2003, Geoderma 116:61, for surface soils)
    organic_retention: dict[str, float] = field(
        default_factory=lambda: {"porosity": 0.01, "field_capacity": 0.01, "wilting_point": 0.004})
    runon_per_twi: float = 0.15  # rain gained (lost) per unit of wetness index above (below) the mean
    texture_50m_sd: dict[str, float] = field(default_factory=lambda: {"sand": 12.0, "clay": 7.0})  # % inside a 9 km cell
    # correlation length km, log SD of the rain multiplier below 9 km
    rain_field: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"convective": (15.0, 0.8), "frontal": (100.0, 0.4)})
    convective_months: tuple[int, ...] = (5, 6, 7, 8, 9)
    crop_season_days: float = 130
    root_uptake: float = 0.3
    layer_mm: float = 100.0  # the modelled surface layer, 0-10 cm as in LSMs such as Noah: probes at 5 cm follow it
    thin_restore: float = 0.3  # the top 2.5 cm relaxes towards the surface layer, per day


C = Constants()


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


# ----- land cover -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LandCover:
    """One land-cover class: its IGBP code and the parameters the physics uses (docs/simulate.md)."""

    name: str
    igbp: int
    wcm_vv: tuple[float, float]  # Water Cloud A, B with NDVI, VV
    wcm_vh: tuple[float, float]  # the same, VH
    rms_cm: tuple[float, float]  # range of the soil's rms height
    ndvi_min: float
    ndvi_max: tuple[float, float]  # at the driest and the wettest climate
    phenology: int  # PHENOLOGY code
    evap_factor: float  # PET share acting on the 0-5 cm layer (shade, litter, bare soil)
    interception: float  # share of rain held by the canopy or sealed surfaces
    stem_factor: float  # SMAP vegetation water content: stem part (kg/m2)


# greenness drivers: constant, temperature, temperature x water, crop calendar x water
CONSTANT, TEMPERATURE, TEMPERATURE_WATER, CROP = 0, 1, 2, 3

LAND_COVER = (
    LandCover("forest", 4, (0.20, 1.1), (0.080, 0.8), (1.5, 3.0), 0.35, (0.80, 0.88), TEMPERATURE, 0.5, 0.20, 12.0),
    LandCover("crop", 12, (0.12, 0.9), (0.060, 0.6), (0.8, 3.0), 0.15, (0.70, 0.82), CROP, 1.0, 0.10, 3.5),
    LandCover("grass", 10, (0.08, 0.5), (0.040, 0.4), (0.6, 1.6), 0.12, (0.35, 0.75), TEMPERATURE_WATER, 0.9, 0.08, 0.0),
    LandCover("shrub", 7, (0.10, 0.5), (0.040, 0.4), (1.0, 2.5), 0.08, (0.22, 0.45), TEMPERATURE_WATER, 1.0, 0.05, 4.0),
    LandCover("urban", 13, (0.0, 0.0), (0.0, 0.0), (1.0, 1.0), 0.15, (0.30, 0.40), TEMPERATURE_WATER, 0.8, 0.30, 0.0),
    LandCover("water", 17, (0.0, 0.0), (0.0, 0.0), (1.0, 1.0), -0.10, (-0.10, -0.10), CONSTANT, 0.0, 0.0, 0.0),
)
FOREST, CROPLAND, GRASS, SHRUB, URBAN, WATER = range(len(LAND_COVER))

# Regional class fractions (forest, crop, grass, shrub, urban, water) in the spirit of NLCD 2016's
# regional composition: the arid west mostly shrub and grass, the plains crop and grass, the humid
# east and the Pacific north-west forest; developed land and open water a few percent everywhere.
REGIONS = {
    "arid": (0.10, 0.05, 0.27, 0.52, 0.03, 0.03),
    "plains": (0.07, 0.48, 0.34, 0.03, 0.05, 0.03),
    "humid_east": (0.44, 0.20, 0.20, 0.02, 0.09, 0.05),
    "humid_west": (0.56, 0.07, 0.15, 0.14, 0.05, 0.03),
}


def land_cover_fractions(lon: np.ndarray, annual_mm: np.ndarray) -> np.ndarray:
    """(n, classes) fractions: arid below 400 mm a year, plains 600-800, humid above 1100
    (east or west of 100 W), linear between."""
    reg = {k: np.array(v) for k, v in REGIONS.items()}
    humid = np.where((lon < -100)[:, None], reg["humid_west"], reg["humid_east"])
    t1 = np.clip((annual_mm - 400.0) / 200.0, 0, 1)[:, None]
    t2 = np.clip((annual_mm - 800.0) / 300.0, 0, 1)[:, None]
    f = (1 - t1) * reg["arid"] + t1 * ((1 - t2) * reg["plains"] + t2 * humid)
    return f / f.sum(1, keepdims=True)


def irrigated_share(annual_mm: np.ndarray) -> np.ndarray:
    """Share of cropland irrigated: about 40 % in the arid west, a few percent in the humid east
    (USDA Census of Agriculture: about one sixth of US cropland, mostly west of 100 W)."""
    return np.clip(0.45 - 0.4 * (annual_mm - 400.0) / 600.0, 0.05, 0.45)


# Rain below the 9 km scale: a log-normal multiplier on the weather cell's rain, a Gaussian field
# with exponential correlation (length and strength by season: convective May-September,
# frontal otherwise)


def _rain_multipliers(groups: list[np.ndarray], pos_km: np.ndarray, days: pd.DatetimeIndex, n_sub: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(days, n_sub) float32 multipliers exp(s z - s^2/2), z correlated inside each group of 50 m
    cells (those of one 9 km cell and its SMAP footprint) as exp(-distance / length)."""
    convective = np.isin(days.month.to_numpy(), C.convective_months)
    out = np.empty((len(days), n_sub), dtype=np.float32)
    for members in groups:
        xy = pos_km[members]
        dist = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        white = rng.standard_normal((len(members), len(days)))
        z = np.empty((len(days), len(members)))
        for season, rows in (("convective", convective), ("frontal", ~convective)):
            length, s = C.rain_field[season]
            chol = np.linalg.cholesky(np.exp(-dist / length) + 1e-9 * np.eye(len(members)))
            z[rows] = s * (chol @ white[:, rows]).T - s * s / 2
        out[:, members] = np.exp(z)
    return out


def _ar1(rng: np.random.Generator, n_days: int, n: int, rho: float, sd: float) -> np.ndarray:
    """(n_days, n) stationary AR(1) series with lag-1 correlation rho and standard deviation sd."""
    shocks = rng.normal(0.0, sd * np.sqrt(1 - rho**2), (n_days, n))
    out = np.empty((n_days, n))
    out[0] = rng.normal(0.0, sd, n)
    for d in range(1, n_days):
        out[d] = rho * out[d - 1] + shocks[d]
    return out


@dataclass
class SurfaceParams:
    """Per 50 m cell parameters of the land-surface model (arrays, or one value for all)."""

    hyd: dict[str, np.ndarray]
    ndvi_min: np.ndarray
    ndvi_max: np.ndarray
    precip_scale: np.ndarray | float = 1.0  # run-on or run-off from the terrain, less interception
    phenology: np.ndarray | int = TEMPERATURE_WATER
    evap_factor: np.ndarray | float = 1.0
    drainage_rate: np.ndarray | float = 0.5
    irrigated: np.ndarray | bool = False
    planting_doy: np.ndarray | float = 120.0


IRRIGATION_MM, IRRIGATION_EVERY, IRRIGATION_SEASON = 25.0, 7, (120, 260)


def water_and_greenness(
    precip: np.ndarray,
    t_air: np.ndarray,
    cell_of: np.ndarray,
    lat: np.ndarray,
    days: pd.DatetimeIndex,
    params: SurfaceParams,
    keep: np.ndarray | None = None,
    rain_mult: np.ndarray | None = None,
    thin_depth_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Daily 0-5 cm soil moisture, NDVI and (with ``thin_depth_mm``) the soil moisture of a
    thinner top layer of 50 m cells: (kept days, cells) float32 each.

    ``precip``/``t_air`` are (days, weather cells); ``cell_of`` maps each 50 m cell to its weather
    cell, ``rain_mult`` (days, cells) scales its rain below the weather cell's scale. Bucket model
    with Hamon PET; plant-available water integrates over ~a month; greenness follows its driver
    (temperature, temperature x water, or the crop calendar) with ~2 weeks lag. Irrigated cells
    get 25 mm when their available water falls below 0.4 in the growing season, at most weekly.
    ``keep`` (bool per day) stores only those days.
    """
    doy = days.day_of_year.to_numpy()
    keep = np.ones(len(days), bool) if keep is None else np.asarray(keep, bool)
    n = len(cell_of)
    hyd, p = params.hyd, params
    phen = np.broadcast_to(np.asarray(p.phenology), (n,))
    irrigated = np.broadcast_to(np.asarray(p.irrigated, bool), (n,))
    theta = 0.5 * (hyd["field_capacity"] + hyd["wilting_point"])
    thin = theta.copy() if thin_depth_mm else None
    sm = np.empty((int(keep.sum()), n), dtype=np.float32)
    ndvi = np.empty_like(sm)
    sm_thin = np.empty_like(sm) if thin_depth_mm else None
    avail, green = np.zeros(n), np.zeros(n)
    since = np.full(n, IRRIGATION_EVERY)
    k = 0
    for d in range(len(days)):
        t = t_air[d, cell_of]
        # vegetation shades the soil: evaporation falls with the cover (FAO-56 eq. 76: the
        # exposed fraction), cover from scaled NDVI squared (Carlson & Ripley 1997); under full
        # cover C.root_uptake of PET still leaves the layer through roots
        ndvi_now = p.ndvi_min + (p.ndvi_max - p.ndvi_min) * green
        cover = np.clip((ndvi_now - 0.1) / 0.7, 0, 1) ** 2
        evap = p.evap_factor * (1 - (1 - C.root_uptake) * cover)
        pet = physics.hamon_pet(t, physics.day_length_hours(lat, doy[d]))
        rain = precip[d, cell_of] * p.precip_scale
        if rain_mult is not None:
            rain = rain * rain_mult[d]
        if irrigated.any():
            season = IRRIGATION_SEASON[0] <= doy[d] <= IRRIGATION_SEASON[1]
            need = irrigated & season & (avail < 0.4) & (since >= IRRIGATION_EVERY)
            rain = rain + IRRIGATION_MM * need
            since = np.where(need, 0, since + 1)
        theta = physics.bucket_step(theta, rain, pet, hyd, C.layer_mm, p.drainage_rate, evap)
        if thin is not None:
            thin = physics.bucket_step(thin, rain, pet, hyd, thin_depth_mm, p.drainage_rate, evap)
            thin = thin + C.thin_restore * (theta - thin)
        rel = np.clip((theta - hyd["wilting_point"]) / (hyd["field_capacity"] - hyd["wilting_point"]), 0, 1)
        avail += (rel - avail) / 30.0
        f_t = 1.0 / (1.0 + np.exp(-(t - 10.0) / 3.0))
        water = np.sqrt(avail)
        x = (doy[d] - p.planting_doy) / C.crop_season_days
        calendar = np.where((x > 0) & (x < 1), np.sin(np.pi * np.clip(x, 0, 1)), 0.0)
        target = np.select([phen == TEMPERATURE, phen == TEMPERATURE_WATER, phen == CROP],
                           [f_t, f_t * water, calendar * np.where(irrigated, 1.0, water)], 0.0)
        green += (target - green) / 15.0
        if keep[d]:
            sm[k] = theta
            ndvi[k] = p.ndvi_min + (p.ndvi_max - p.ndvi_min) * green
            if sm_thin is not None:
                sm_thin[k] = thin
            k += 1
    return sm, ndvi, sm_thin


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
    """Generate the fine, coarse and pretraining tables (deterministic for ``cfg.seed``).

    The stages, in order (every random draw comes from one generator, in this order): places
    and weather, the 50 m cells and their rain, land cover, soil and terrain, the daily water
    balance and NDVI, the Sentinel-1 and SMAP calendars, SMAP retrievals, the station (fine)
    table, the 9 km tables, and the record of what only the generator sees.
    """
    cfg = cfg or SimConfig()
    cfg.check()
    g = _Generator(cfg)
    g.places_and_weather()
    g.subcells_and_rain()
    g.land_cover()
    g.soil_and_terrain()
    g.water_and_ndvi()
    g.calendars()
    g.smap_retrievals()
    g.sar_surfaces()
    fine = g.fine_table()
    coarse, pretrain = g.coarse_tables()
    return g.benchmark(fine, coarse, pretrain)


class _Generator:
    """The state ``simulate`` builds stage by stage; each stage reads what the earlier ones set."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        start, end = pd.Timestamp(cfg.start), pd.Timestamp(cfg.end)
        self.days = pd.date_range(start - pd.Timedelta(days=HISTORY_DAYS + SPINUP_DAYS), end, freq="D")
        self.first = HISTORY_DAYS + SPINUP_DAYS

    def places_and_weather(self) -> None:
        """Stations, 9 km cells (station cells first, then pretraining cells; the pretraining table
        covers both), and the daily weather of every cell."""
        cfg, rng = self.cfg, self.rng
        stations = _place_stations(cfg, rng)
        pre = _pretrain_cells(cfg, rng)
        st_cells = stations[["r", "c"]].drop_duplicates().reset_index(drop=True)
        cells = pd.concat([st_cells.assign(kind="station"), pre[["r", "c"]].assign(kind="pretrain")], ignore_index=True)
        cells = cells.drop_duplicates(["r", "c"]).reset_index(drop=True)
        cx, cy = GRID_9KM.center(cells["r"].to_numpy(), cells["c"].to_numpy())
        cells["lon"], cells["lat"] = xy_to_lonlat(cx, cy)
        is_pre = (cells["kind"] == "pretrain").to_numpy()
        # pretraining cells are more varied: wider spread of the climate (standing for global data)
        wetness = np.exp(rng.normal(0, np.where(is_pre, 0.35, 0.12)))
        self.lon_c, self.lat_c = cells["lon"].to_numpy(), cells["lat"].to_numpy()
        self.precip, self.t_air = _weather(self.lon_c, self.lat_c, self.days, rng, wetness)
        self.annual = _climate(self.lon_c, self.lat_c)["precip_mm"] * wetness
        self.stations, self.st_cells, self.cells, self.cx, self.cy = stations, st_cells, cells, cx, cy
        self.n_cells = len(cells)

    def subcells_and_rain(self) -> None:
        """The 50 m cells: ``C.inner`` inside each 9 km cell, ``C.footprint`` in its SMAP footprint,
        and the stations' own; their positions, and the rain multiplier below 9 km."""
        rng, stations, cells, n_cells = self.rng, self.stations, self.cells, self.n_cells
        self.cell_of = {(r, c): i for i, (r, c) in enumerate(zip(cells["r"], cells["c"]))}
        st_cell = np.array([self.cell_of[(r, c)] for r, c in zip(stations["r"], stations["c"])], dtype=int)
        n_inner, n_foot = n_cells * C.inner, n_cells * C.footprint
        sub_cell = np.concatenate([np.repeat(np.arange(n_cells), C.inner), np.repeat(np.arange(n_cells), C.footprint),
                                   st_cell])
        n_sub = len(sub_cell)
        inner_sub = np.arange(n_inner).reshape(n_cells, C.inner)
        foot_sub = n_inner + np.arange(n_foot).reshape(n_cells, C.footprint)
        station_sub = n_inner + n_foot + np.arange(len(stations))
        half = GRID_9KM.cell_m / 2000.0
        sx, sy = lonlat_to_xy(stations["lon"].to_numpy(), stations["lat"].to_numpy())
        pos_km = np.concatenate([
            rng.uniform(-half, half, (n_inner, 2)),
            rng.normal(0.0, C.smap_footprint_km / 2.3548, (n_foot, 2)),  # Gaussian footprint of that FWHM
            np.column_stack([(sx - self.cx[st_cell]) / 1000.0, (sy - self.cy[st_cell]) / 1000.0]),
        ])
        groups = [np.concatenate([inner_sub[j], foot_sub[j], station_sub[st_cell == j]]) for j in range(n_cells)]
        self.rain_mult = _rain_multipliers(groups, pos_km, self.days, n_sub, rng)
        self.st_cell, self.sub_cell, self.n_sub = st_cell, sub_cell, n_sub
        self.inner_sub, self.foot_sub, self.station_sub = inner_sub, foot_sub, station_sub

    def land_cover(self) -> None:
        """Classes drawn from the cell's regional fractions; stations on open grass or crop."""
        rng, n_sub = self.rng, self.n_sub
        fractions = land_cover_fractions(self.lon_c, self.annual)
        cum = np.cumsum(fractions[self.sub_cell], axis=1)
        lc = (rng.uniform(size=n_sub)[:, None] > cum).sum(1).clip(0, len(LAND_COVER) - 1)
        lc[self.station_sub] = np.where(rng.uniform(size=len(self.stations)) < C.station_on_grass, GRASS, CROPLAND)
        self.lc, self.land = lc, lc != WATER

    def soil_and_terrain(self) -> None:
        """Smooth regional texture plus 50 m heterogeneity (the inputs carry SoilGrids-like error),
        unseen organic matter, Cosby hydraulics; elevation, slope, aspect, wetness index, run-on and
        drainage."""
        rng, n_sub, n_cells, sub_cell = self.rng, self.n_sub, self.n_cells, self.sub_cell
        lon_c, lat_c, annual = self.lon_c, self.lat_c, self.annual
        sand_f, clay_f = _smooth_field(rng), _smooth_field(rng)
        sand_c = np.clip(45 + 28 * sand_f(lon_c, lat_c) + 10 * (lon_c < -100), 5, 90)
        clay_c = np.clip(20 + 15 * clay_f(lon_c, lat_c) + 6 * (lon_c > -95) - 6 * (lon_c < -105), 3, 55)
        sand = np.clip(sand_c[sub_cell] + rng.normal(0, C.texture_50m_sd["sand"], n_sub), 3, 95)
        clay = np.clip(clay_c[sub_cell] + rng.normal(0, C.texture_50m_sd["clay"], n_sub), 2, 65)
        clay = np.minimum(clay, 97 - sand)
        bulk = np.clip(170 - 0.45 * clay - 0.1 * (100 - sand) + rng.normal(0, 6, n_sub), 105, 178)
        err = {k: rng.normal(0, cell_sd, n_cells)[sub_cell] + rng.normal(0, pixel_sd, n_sub)
               for k, (cell_sd, pixel_sd) in C.soilgrids_error.items()}
        sand_in = np.clip(sand + err["sand"], 1, 97)
        self.clay_in = np.clip(np.minimum(clay + err["clay"], 99 - sand_in), 1, 80)
        self.bulk_in = np.clip(bulk + err["bulk_density"], 100, 180)
        self.sand, self.clay, self.sand_in = sand, clay, sand_in
        # organic matter (%), seen by no input: more under wetter climates, raising water retention
        organic = np.exp(rng.normal(np.log(0.8 + 3.0 * np.clip(annual / 1300.0, 0, 1)[sub_cell]), 0.6, n_sub))
        hyd = physics.cosby_hydraulics(sand, clay)
        self.hyd = {k: v + C.organic_retention.get(k, 0.0) * organic for k, v in hyd.items()}

        elev_c = _elevation(lon_c, lat_c) + rng.normal(0, 60, n_cells)
        relief = np.clip(np.exp(-(((lon_c + 110) / 8) ** 2)) + 0.5 * np.exp(-(((lon_c + 81) / 3) ** 2)), 0.05, 1)
        self.elev = np.maximum(elev_c[sub_cell] + rng.normal(0, 40 * relief[sub_cell] + 5, n_sub), 0)
        self.slope = np.clip(rng.gamma(1.5, 1.0 + 8.0 * relief[sub_cell]), 0, 40)
        self.aspect = rng.uniform(0, 360, n_sub)
        catchment = np.exp(rng.normal(np.log(100.0), 1.0, n_sub))  # specific upslope area (m), no input
        self.twi = physics.wetness_index(self.slope, catchment)
        self.runon = np.clip(1 + C.runon_per_twi * (self.twi - C.twi_mean), 0.5, 2.0)
        # drainage of the surface layer: 0.5 a day for a loam, faster in sand, slower in clay (sqrt of
        # the Cosby conductivity ratio), slower where water converges
        loam_ks = physics.cosby_hydraulics(np.array([40.0]), np.array([20.0]))["ks_mm_day"]
        self.drainage = np.clip(0.5 * np.sqrt(self.hyd["ks_mm_day"] / loam_ks) * np.exp(-0.25 * (self.twi - C.twi_mean)),
                                0.05, 0.95)

    def water_and_ndvi(self) -> None:
        """The daily water balance (surface layer and thin top layer) and NDVI of every 50 m cell."""
        rng, n_sub, lc, sub_cell = self.rng, self.n_sub, self.lc, self.sub_cell
        self.cls = cls = {f: np.array([getattr(c, f) for c in LAND_COVER]) for f in
                          ("ndvi_min", "phenology", "evap_factor", "interception", "stem_factor")}
        wet01 = np.clip(self.annual / 1300.0, 0, 1)[sub_cell]
        nmax_lo, nmax_hi = (np.array([c.ndvi_max[i] for c in LAND_COVER]) for i in (0, 1))
        ndvi_max = nmax_lo[lc] + (nmax_hi[lc] - nmax_lo[lc]) * wet01 + rng.normal(0, 0.03, n_sub)
        ndvi_min = cls["ndvi_min"][lc] + rng.normal(0, 0.02, n_sub)
        evergreen = (lc == FOREST) & (self.lon_c[sub_cell] < -100)
        ndvi_min[evergreen] = 0.6 + rng.normal(0, 0.03, int(evergreen.sum()))
        ndvi_max = np.maximum(ndvi_max, ndvi_min + 0.05)
        irrigated = (lc == CROPLAND) & (rng.uniform(size=n_sub) < irrigated_share(self.annual[sub_cell]))
        irrigated[self.station_sub] = False
        params = SurfaceParams(
            self.hyd, ndvi_min, ndvi_max, precip_scale=self.runon * (1 - cls["interception"][lc]),
            phenology=cls["phenology"][lc], evap_factor=cls["evap_factor"][lc], drainage_rate=self.drainage,
            irrigated=irrigated, planting_doy=100 + 3 * (self.lat_c[sub_cell] - 30) + rng.normal(0, 7, n_sub),
        )
        self.sm, self.ndvi, self.thin = water_and_greenness(self.precip, self.t_air, sub_cell, self.lat_c[sub_cell],
                                                            self.days, params, rain_mult=self.rain_mult,
                                                            thin_depth_mm=C.sensing_depth_mm)
        self.ndvi_min, self.ndvi_max = ndvi_min, ndvi_max
        del self.rain_mult

    def calendars(self) -> None:
        """Sample counts per network (Table 2, scaled), Sentinel-1 dates per cell without frozen
        days, and SMAP's AM / PM availability."""
        cfg, rng, stations, cells, n_cells = self.cfg, self.rng, self.stations, self.cells, self.n_cells
        days, first = self.days, self.first
        self.n_years = (len(days) - first) / 365.25
        counts = stations["network"].value_counts()
        self.fine_target = {n: NETWORKS[n].fine_samples * counts.get(n, 0) / NETWORKS[n].stations for n in cfg.networks}
        self.coarse_target = {n: NETWORKS[n].coarse_samples * counts.get(n, 0) / NETWORKS[n].stations for n in cfg.networks}
        self.first_station = stations.drop_duplicates(["r", "c"])  # a 9 km cell is named after its first station
        first_net = self.first_station.set_index(["r", "c"])["network"]
        cells_per_net = first_net.value_counts()
        self.pre_per_cell = max(1, int(cfg.pretrain_samples_per_cell))
        per_month = self.n_years * 365.25 / 12
        passes = np.full(n_cells, int(np.clip(np.ceil(self.pre_per_cell * 1.6 / per_month), 2, 8)))
        for i in range(len(self.st_cells)):
            net = first_net.loc[(cells.at[i, "r"], cells.at[i, "c"])]
            per_cell = max(self.coarse_target[net] / cells_per_net[net], self.pre_per_cell)
            passes[i] = int(np.clip(np.ceil(per_cell * 1.6 / per_month), 2, 8))
        s1 = _s1_dates(n_cells, days, first, rng, passes)
        # frozen ground: ISMN flags in situ data under 0 degC (flags D01-D03, Dorigo et al. 2013) and
        # SMAP retrieves nothing, so neither scale has samples on frozen days
        t_air = self.t_air
        self.s1 = [(d[t_air[d, j] >= 0.0], a[t_air[d, j] >= 0.0]) for j, (d, a) in enumerate(s1)]
        self.smap_am = rng.uniform(size=(len(days), n_cells)) < 0.55
        self.smap_pm = rng.uniform(size=(len(days), n_cells)) < 0.55

    def area_mean(self, daily: np.ndarray, subs: np.ndarray, gathered: bool = False) -> np.ndarray:
        """(days, cells): mean over each cell's 50 m cells ``subs`` (cells, k), open water left
        out; ``gathered``: ``daily`` already holds those columns, (days, cells * k)."""
        w = self.land[subs].astype(np.float64)
        values = daily.reshape(len(daily), *subs.shape) if gathered else daily[:, subs]
        return np.einsum("dck,ck->dc", values, w, dtype=np.float64) / np.maximum(w.sum(1), 1)

    def smap_retrievals(self) -> None:
        """SMAP-like 9 km soil moisture: the top layer over the ~35 km footprint, a dry bias and
        noise that grow with vegetation water content, AM and PM passes merged."""
        rng, foot_sub, lc, ndvi = self.rng, self.foot_sub, self.lc, self.ndvi
        self.cell_mean = self.area_mean(self.sm, self.inner_sub)
        footprint = self.area_mean(self.thin, foot_sub)
        fs = foot_sub.ravel()  # vegetation water content of the footprint's cells only
        vwc_foot = self.area_mean(physics.vegetation_water_content(ndvi[:, fs], self.ndvi_min[fs], self.ndvi_max[fs],
                                                                   self.cls["stem_factor"][lc[fs]]), foot_sub,
                                  gathered=True)
        bias = -(C.smap_dry_bias[0] + C.smap_dry_bias[1] * vwc_foot)
        noise_sd = C.smap_noise[0] + C.smap_noise[1] * vwc_foot
        pm_bias = rng.normal(0.015, 0.01, self.n_cells)
        am = footprint + bias + noise_sd * rng.standard_normal(footprint.shape)
        pm = footprint + bias + pm_bias + noise_sd * rng.standard_normal(footprint.shape)
        am[~self.smap_am | (self.t_air < 0)], pm[~self.smap_pm | (self.t_air < 0)] = np.nan, np.nan
        pm_corrected = pm - (np.nanmean(pm, axis=0) - np.nanmean(am, axis=0))  # PM to AM by mean difference
        n_obs = (~np.isnan(am)).astype(int) + (~np.isnan(pm_corrected))
        total = np.nan_to_num(am) + np.nan_to_num(pm_corrected)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.smap = np.where(n_obs > 0, np.clip(total / n_obs, 0.02, 0.6), np.nan)

    def sar_surfaces(self) -> None:
        """What Sentinel-1 sees besides soil and vegetation: roughness by class, static clutter,
        urban backscatter."""
        rng, lc, n_sub = self.rng, self.lc, self.n_sub
        self.wcm = {k: np.array([getattr(c, k) for c in LAND_COVER]) for k in ("wcm_vv", "wcm_vh")}
        rms_lo, rms_hi = (np.array([c.rms_cm[i] for c in LAND_COVER]) for i in (0, 1))
        self.rms_cm = rng.uniform(rms_lo[lc], rms_hi[lc])
        z1, z2 = rng.normal(0, C.clutter_db, n_sub), rng.normal(0, C.clutter_db, n_sub)
        self.clutter_vv, self.clutter_vh = 10 ** (z1 / 10), 10 ** ((0.7 * z1 + 0.714 * z2) / 10)
        self.urban_vv = 10 ** (rng.normal(-6.0, 3.0, n_sub) / 10)
        self.igbp = np.array([c.igbp for c in LAND_COVER])

    def sar(self, sub: np.ndarray, d: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Linear VV and VH of 50 m cells ``sub`` on days ``d``: soil (Oh) under a Water Cloud per
        class; urban and water without soil signal; clutter."""
        c = self.lc[sub]
        veg = self.ndvi[d, sub].astype(float)
        vv_s, vh_s = physics.oh_bare_soil(self.thin[d, sub].astype(float), angle, self.rms_cm[sub])
        wcm = self.wcm
        vv = physics.water_cloud(vv_s, veg, angle, a=wcm["wcm_vv"][c, 0], b=wcm["wcm_vv"][c, 1])
        vh = physics.water_cloud(vh_s, veg, angle, a=wcm["wcm_vh"][c, 0], b=wcm["wcm_vh"][c, 1])
        wind = 10 ** (self.rng.normal(0, 3.0, len(sub)) / 10)
        vv = np.select([c == URBAN, c == WATER], [self.urban_vv[sub], 10**-2.0 * wind], vv)
        vh = np.select([c == URBAN, c == WATER], [self.urban_vv[sub] * 10**-0.7, 10**-2.7 * wind], vh)
        return vv * self.clutter_vv[sub], vh * self.clutter_vh[sub]

    def speckle(self, n: int, looks: float) -> np.ndarray:
        return self.rng.gamma(looks, 1.0 / looks, n)

    def features(self, cell: np.ndarray, d: np.ndarray, angle: np.ndarray, vv: np.ndarray, vh: np.ndarray,
                 soil: dict[str, np.ndarray], ndvi_daily: np.ndarray, ndvi_col: np.ndarray) -> pd.DataFrame:
        """The normalised Table 1 features of samples (9 km cell, day, angle, backscatter, soil)."""
        raw = {
            "vv": physics.db(vv), "vh": physics.db(vh), "angle": angle,
            "doy": self.days[d].day_of_year.to_numpy().astype(float), **soil,
            "row_9km": self.cells["r"].to_numpy()[cell].astype(float),
            "col_9km": self.cells["c"].to_numpy()[cell].astype(float),
        }
        frame = pd.DataFrame(raw)
        series = {
            "ndvi": _eight_day_series(ndvi_daily, ndvi_col, d),
            "t2m": _eight_day_series(self.t_air, cell, d),
            "tp": _eight_day_series(self.precip, cell, d) / 1000.0,
        }
        cols = {f"{k}_{i:02d}": v[:, i] for k, v in series.items() for i in range(STEPS)}
        frame = pd.concat([frame, pd.DataFrame(cols)], axis=1)
        f = DEFAULT_SCHEMA.encode(frame)
        return pd.DataFrame(DEFAULT_SCHEMA.normalise(f), columns=DEFAULT_SCHEMA.feature_names)

    def fine_table(self) -> pd.DataFrame:
        """Each station's own 50 m cell on Sentinel-1 dates of its record; the truth is the probe's
        reading: its point (AR(1) error against the cell) through its calibration."""
        cfg, rng, stations, st_cell, s1 = self.cfg, self.rng, self.stations, self.st_cell, self.s1
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
            k_station[idx] = _split_total(int(round(self.fine_target[net])), len(idx), caps[idx], rng)
        rows_st, rows_d, rows_a = [], [], []
        for i in range(len(stations)):
            dates, angles = s1[st_cell[i]]
            k = k_station[i]
            s0 = rng.integers(0, len(dates) - k + 1)  # the station's record: k consecutive acquisitions
            rows_st.append(np.full(k, i))
            rows_d.append(dates[s0 : s0 + k])
            rows_a.append(angles[s0 : s0 + k])
        si, sd, sa = np.concatenate(rows_st), np.concatenate(rows_d), np.concatenate(rows_a)
        sub = self.station_sub[si]
        vv, vh = self.sar(sub, sd, sa)
        vv, vh = vv * self.speckle(len(sub), C.looks_50m), vh * self.speckle(len(sub), C.looks_50m)
        soil = {"sand": self.sand_in[sub] * 10, "clay": self.clay_in[sub] * 10, "bulk_density": self.bulk_in[sub],
                "elevation": self.elev[sub], "slope": self.slope[sub], "aspect_deg": self.aspect[sub]}
        feats = self.features(st_cell[si], sd, sa, vv, vh, soil, self.ndvi, sub)
        rho, rep_sd = C.representativeness
        point_error = _ar1(rng, len(self.days), len(stations), rho, rep_sd)
        self.point = np.clip(self.sm[:, self.station_sub] + point_error, 0.005, None)
        # factory calibrations over-read in clay (dielectric loss), and each installation differs
        self.gain = (1 + C.calibration["gain_per_clay"] * (self.clay[self.station_sub] - 20)
                     + rng.normal(0, C.calibration["gain_sd"], len(stations)))
        self.offset = rng.normal(0.0, C.calibration["offset_sd"], len(stations))
        truth = self.gain[si] * self.point[sd, si] + self.offset[si] + rng.normal(0, C.sensor_noise, len(sub))
        truth = np.clip(truth, 0.005, 0.6)
        ids = pd.DataFrame({
            "network": stations["network"].to_numpy()[si], "station": stations["station"].to_numpy()[si],
            "r": stations["r"].to_numpy()[si], "c": stations["c"].to_numpy()[si], "date": self.days[sd],
            "lc": self.igbp[self.lc[sub]], "sm_m3m3": truth,
        })
        return pd.concat([ids, feats], axis=1)

    def coarse_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The 9 km tables (stations' cells; every cell for pretraining): area means of the cell's
        50 m cells on Sentinel-1 dates with a SMAP retrieval."""
        cfg, rng, cells, n_cells = self.cfg, self.rng, self.cells, self.n_cells
        inner_sub = self.inner_sub
        self.ndvi_cell = self.ndvi[:, inner_sub].mean(2, dtype=np.float64)  # NDVI mixes all classes, water too
        counts_lc = np.stack([(self.lc[inner_sub] == k).sum(1) for k in range(len(LAND_COVER))], axis=1)
        self.dominant = self.igbp[np.argmax(counts_lc, axis=1)]
        pre_names = [("PRETRAIN", f"cell_{r}_{c}") for r, c in zip(cells["r"], cells["c"])]
        names: list[tuple[str, str]] = list(pre_names)  # station cells named after their first station
        for _, row in self.first_station.iterrows():
            names[self.cell_of[(row["r"], row["c"])]] = (row["network"], row["station"])
        st_cell_idx = np.arange(len(self.st_cells))
        counts = np.zeros(len(self.st_cells), dtype=int)
        cap9 = np.array([int((~np.isnan(self.smap[self.s1[j][0], j])).sum()) for j in st_cell_idx])
        nets_of_cell = np.array([names[j][0] for j in st_cell_idx])
        for net in cfg.networks:
            idx = np.flatnonzero(nets_of_cell == net)
            counts[idx] = _split_total(int(round(self.coarse_target[net])), len(idx), cap9[idx], rng)
        coarse = self._coarse_rows(st_cell_idx, counts, names)
        pretrain = self._coarse_rows(np.arange(n_cells), np.full(n_cells, self.pre_per_cell), pre_names)
        return coarse, pretrain

    def _coarse_rows(self, cell_idx: np.ndarray, counts: np.ndarray, name_of: list[tuple[str, str]]) -> pd.DataFrame:
        """Samples of these cells, built 100 cells at a time (bounded memory)."""
        parts = [self._coarse_block(cell_idx[i : i + 100], counts[i : i + 100], name_of)
                 for i in range(0, len(cell_idx), 100)]
        return pd.concat(parts, ignore_index=True)

    def _coarse_block(self, cell_idx: np.ndarray, counts: np.ndarray, name_of: list[tuple[str, str]]) -> pd.DataFrame:
        rng, smap = self.rng, self.smap
        ci, di, ai = [], [], []
        for j, k in zip(cell_idx, counts):
            dates, angles = self.s1[j]
            ok = ~np.isnan(smap[dates, j])
            dates, angles = dates[ok], angles[ok]
            k = min(k, len(dates))
            s0 = rng.integers(0, len(dates) - k + 1)
            ci.append(np.full(k, j))
            di.append(dates[s0 : s0 + k])
            ai.append(angles[s0 : s0 + k])
        ci, di, ai = np.concatenate(ci), np.concatenate(di), np.concatenate(ai)
        # sigma0 of the cell: mean of its 50 m cells' linear sigma0 (speckle averages out)
        subs = self.inner_sub[ci]
        vv_sub, vh_sub = self.sar(subs.ravel(), np.repeat(di, C.inner), np.repeat(ai, C.inner))
        looks = C.looks_50m * GRID_9KM.ratio(GRID_50M) ** 2
        vv = vv_sub.reshape(-1, C.inner).mean(1) * self.speckle(len(ci), looks)
        vh = vh_sub.reshape(-1, C.inner).mean(1) * self.speckle(len(ci), looks)
        rad = np.radians(self.aspect[subs])
        soil = {"sand": self.sand_in[subs].mean(1) * 10, "clay": self.clay_in[subs].mean(1) * 10,
                "bulk_density": self.bulk_in[subs].mean(1), "elevation": self.elev[subs].mean(1),
                "slope": self.slope[subs].mean(1),
                "aspect_deg": np.degrees(np.arctan2(np.sin(rad).mean(1), np.cos(rad).mean(1))) % 360}
        feats = self.features(ci, di, ai, vv, vh, soil, self.ndvi_cell, ci)
        ids = pd.DataFrame({
            "network": [name_of[j][0] for j in ci], "station": [name_of[j][1] for j in ci],
            "r": self.cells["r"].to_numpy()[ci], "c": self.cells["c"].to_numpy()[ci], "date": self.days[di],
            "lc": self.dominant[ci], "sm_m3m3": smap[di, ci],
        })
        return pd.concat([ids, feats], axis=1)

    def benchmark(self, fine_frame: pd.DataFrame, coarse_frame: pd.DataFrame, pretrain_frame: pd.DataFrame) -> Benchmark:
        """The tables, the stations with what the generator knows of them, the daily series of one
        station for the plots, and the diagnostics only the generator sees (for validation)."""
        cfg, stations, first, days = self.cfg, self.stations, self.first, self.days
        station_sub, st_cell = self.station_sub, self.st_cell
        fine = samples_from_frame(fine_frame, "fine")
        coarse = samples_from_frame(coarse_frame, "coarse")
        pretrain = samples_from_frame(pretrain_frame, "coarse")
        i0 = int(np.flatnonzero(stations["network"].to_numpy() == ("SCAN" if "SCAN" in cfg.networks else cfg.networks[0]))[0])
        j0 = st_cell[i0]
        series = {"station": pd.DataFrame({
            "date": days[first:], "sm_50m": self.sm[first:, station_sub[i0]], "sm_9km_true": self.cell_mean[first:, j0],
            "smap": self.smap[first:, j0], "precip_mm": self.precip[first:, j0],
            "ndvi": self.ndvi[first:, station_sub[i0]],
        }).assign(station=stations.at[i0, "station"])}
        stations = stations.assign(
            sand_pct=self.sand[station_sub], clay_pct=self.clay[station_sub], porosity=self.hyd["porosity"][station_sub],
            annual_precip_mm=self.precip[first:, st_cell].sum(0) / self.n_years,
            land_cover=[LAND_COVER[k].name for k in self.lc[station_sub]], wetness_index=self.twi[station_sub],
            probe_gain=self.gain, probe_offset=self.offset,
        )
        inner = self.sm[first:][:, self.inner_sub]  # (days, cells, C.inner)
        inner = np.where(self.land[self.inner_sub][None], inner, np.nan)
        diagnostics = {
            # (days, cells): SD and mean of the 50 m soil moisture inside each 9 km cell
            "within_cell_sd": np.nanstd(inner, axis=2, ddof=1).astype(np.float32),
            "within_cell_mean": np.nanmean(inner, axis=2).astype(np.float32),
            "station_sm_point": self.point[first:],  # (days, stations): the probe's point, before calibration
            "station_sm_9km": self.cell_mean[first:, st_cell],  # (days, stations): the mean of its 9 km cell
            "looks_50m": C.looks_50m,
        }
        return Benchmark(fine, coarse, pretrain, stations, cfg, series, diagnostics)
