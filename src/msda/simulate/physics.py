"""Published physical models used by the generator; each a pure function of arrays.

References (equation numbers in docs/simulate.md):
- Cosby et al. (1984), Water Resour. Res. 20:682: soil hydraulic parameters from texture.
- Topp, Davis & Annan (1980), Water Resour. Res. 16:574: dielectric constant of moist soil.
- Oh, Sarabandi & Ulaby (1992), IEEE TGRS 30:370: bare-soil backscatter, VV and cross-pol.
- Attema & Ulaby (1978), Radio Sci. 13:357: Water Cloud Model for the vegetation layer.
- Hamon (1961), J. Hydraul. Div. ASCE 87:107: temperature-based potential evaporation.
- Oh (2002), IEEE TGRS 40:1348 (Oh, Sarabandi & Ulaby's revised model): cross-pol ratio q.
- Allen et al. (1998), FAO Irrigation and Drainage Paper 56, ch. 7: evaporation reduction Kr.
- Beven & Kirkby (1979), Hydrol. Sci. Bull. 24:43: topographic wetness index.
- SMAP L2 passive ATBD (O'Neill et al.), after Jackson et al. (2004): vegetation water content from NDVI.
"""

from __future__ import annotations

import numpy as np

C_BAND_WAVENUMBER = 2 * np.pi / 5.547  # Sentinel-1, 5.405 GHz, per cm


def cosby_hydraulics(sand_pct: np.ndarray, clay_pct: np.ndarray) -> dict[str, np.ndarray]:
    """Porosity, field capacity, wilting point (m3/m3) and saturated conductivity (mm/day) from
    texture (Cosby et al. 1984, Table 4).

    theta_s = (50.5 - 0.142 sand - 0.037 clay)/100; b = 3.10 + 0.157 clay - 0.003 sand;
    psi_s = 10**(1.54 - 0.0095 sand + 0.0063 silt) cm; theta(psi) = theta_s (psi/psi_s)**(-1/b),
    field capacity at 330 cm (33 kPa), wilting point at 15,300 cm (1500 kPa).
    """
    silt = 100.0 - sand_pct - clay_pct
    theta_s = (50.5 - 0.142 * sand_pct - 0.037 * clay_pct) / 100.0
    b = 3.10 + 0.157 * clay_pct - 0.003 * sand_pct
    psi_s = 10 ** (1.54 - 0.0095 * sand_pct + 0.0063 * silt)
    theta_fc = theta_s * (330.0 / psi_s) ** (-1.0 / b)
    theta_wp = theta_s * (15300.0 / psi_s) ** (-1.0 / b)
    # saturated conductivity, Cosby et al. (1984) Table 4: log10 Ks = -0.60 + 0.0126 sand - 0.0064 clay (in/h)
    ks_mm_day = 25.4 * 24 * 10 ** (-0.60 + 0.0126 * sand_pct - 0.0064 * clay_pct)
    return {"porosity": theta_s, "field_capacity": np.minimum(theta_fc, 0.95 * theta_s), "wilting_point": theta_wp,
            "ks_mm_day": ks_mm_day}


def hamon_pet(t_air_c: np.ndarray, day_length_h: np.ndarray) -> np.ndarray:
    """Potential evaporation (mm/day), Hamon (1961): 0.1651 * (N/12) * rho_sat(T) * 29.8/... form.

    PET = 0.1651 * (N / 12) * RHOSAT, RHOSAT = 216.7 * e_s / (T + 273.3), e_s in hPa (Tetens).
    """
    e_s = 6.108 * np.exp(17.27 * t_air_c / (t_air_c + 237.3))
    rho_sat = 216.7 * e_s / (t_air_c + 273.3)
    return 0.1651 * (day_length_h / 12.0) * rho_sat


def day_length_hours(lat_deg: np.ndarray, doy: np.ndarray) -> np.ndarray:
    """Astronomical day length (hours) from latitude and day of year (Forsythe-type formula)."""
    decl = 0.409 * np.sin(2 * np.pi * doy / 365.0 - 1.39)
    x = -np.tan(np.radians(lat_deg)) * np.tan(decl)
    return 24.0 / np.pi * np.arccos(np.clip(x, -1.0, 1.0))


def bucket_step(
    theta: np.ndarray,
    precip_mm: np.ndarray,
    pet_mm: np.ndarray,
    hyd: dict[str, np.ndarray],
    depth_mm: float = 50.0,
    drainage_rate: np.ndarray | float = 0.5,
    evap_factor: np.ndarray | float = 1.0,
) -> np.ndarray:
    """One day of a surface-layer water balance (0-5 cm by default); soil moisture in m3/m3.

    Infiltration fills up to porosity (excess runs off). Evaporation = evap_factor * PET * Kr,
    Kr the FAO-56 reduction (Allen et al. 1998, eq. 74) on the layer's evaporable water, which
    reaches down to half the wilting point (FAO-56 eq. 73: TEW = (FC - 0.5 WP) Ze), with the
    readily evaporable part (stage 1, Kr = 1) 35 % of it (FAO-56 Table 19: REW/TEW ~ 0.3-0.4).
    Drainage = k (theta - fc) above field capacity.
    """
    por, fc, wp = hyd["porosity"], hyd["field_capacity"], hyd["wilting_point"]
    theta = np.minimum(theta + precip_mm / depth_mm, por)
    dry = 0.5 * wp
    kr = np.clip((theta - dry) / (0.65 * (fc - dry)), 0.0, 1.0)
    theta = theta - evap_factor * pet_mm * kr / depth_mm
    theta = theta - drainage_rate * np.maximum(theta - fc, 0.0)
    return np.maximum(theta, dry)


def topp_permittivity(theta: np.ndarray) -> np.ndarray:
    """Relative permittivity of moist soil, Topp et al. (1980): 3.03 + 9.3 t + 146 t^2 - 76.7 t^3."""
    return 3.03 + 9.3 * theta + 146.0 * theta**2 - 76.7 * theta**3


def oh_bare_soil(theta: np.ndarray, angle_deg: np.ndarray, rms_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bare-soil sigma0 (linear) VV and VH with Topp permittivity.

    VV from Oh et al. (1992): p = [1 - (2 th/pi)**(1/(3 G0)) exp(-ks)]**2,
    sigma_vv = g cos^3 th (Gv + Gh) / sqrt(p), g = 0.7 [1 - exp(-0.65 ks**1.8)].
    VH = q VV with the revised cross-pol ratio of Oh (2002), which depends on angle and roughness
    but not on moisture: q = 0.095 (0.13 + sin 1.5 th)**1.4 (1 - exp(-1.3 ks**0.9)). (The 1992
    ratio q = 0.23 sqrt(G0)(1 - exp(-ks)) grows with moisture and makes bare-soil VH more
    sensitive than VV, which observations do not show.)
    """
    eps = topp_permittivity(theta)
    th = np.radians(angle_deg)
    cos, sin2 = np.cos(th), np.sin(th) ** 2
    root = np.sqrt(eps - sin2)
    gamma_h = np.abs((cos - root) / (cos + root)) ** 2
    gamma_v = np.abs((eps * cos - root) / (eps * cos + root)) ** 2
    gamma_0 = np.abs((1 - np.sqrt(eps)) / (1 + np.sqrt(eps))) ** 2
    ks = C_BAND_WAVENUMBER * rms_cm
    p = (1 - (2 * th / np.pi) ** (1 / (3 * gamma_0)) * np.exp(-ks)) ** 2
    g = 0.7 * (1 - np.exp(-0.65 * ks**1.8))
    vv = g * cos**3 * (gamma_v + gamma_h) / np.sqrt(p)
    q = 0.095 * (0.13 + np.sin(1.5 * th)) ** 1.4 * (1 - np.exp(-1.3 * ks**0.9))
    return vv, q * vv


def water_cloud(
    soil_sigma: np.ndarray, veg: np.ndarray, angle_deg: np.ndarray, a: float, b: float
) -> np.ndarray:
    """Water Cloud Model (Attema & Ulaby 1978) with NDVI as the vegetation descriptor (linear).

    sigma = A V cos th (1 - tau2) + tau2 sigma_soil, tau2 = exp(-2 B V / cos th).
    """
    cos = np.cos(np.radians(angle_deg))
    v = np.clip(veg, 0.0, None)
    tau2 = np.exp(-2.0 * b * v / cos)
    return a * v * cos * (1 - tau2) + tau2 * soil_sigma


def wetness_index(slope_deg: np.ndarray, catchment_m: np.ndarray) -> np.ndarray:
    """Topographic wetness index ln(a / tan beta) (Beven & Kirkby 1979): a the specific upslope
    area (m2 per m of contour), beta the local slope (tan beta at least 0.005 on flats)."""
    return np.log(catchment_m / np.maximum(np.tan(np.radians(slope_deg)), 0.005))


def vegetation_water_content(ndvi: np.ndarray, ndvi_min: np.ndarray, ndvi_max: np.ndarray,
                             stem_factor: np.ndarray) -> np.ndarray:
    """Vegetation water content (kg/m2) as the SMAP baseline computes it from NDVI: foliage
    1.9134 NDVI^2 - 0.3215 NDVI plus stem_factor (NDVI_max - NDVI_min)/(1 - NDVI_min)."""
    foliage = np.maximum(1.9134 * ndvi**2 - 0.3215 * ndvi, 0.0)
    return foliage + stem_factor * np.clip((ndvi_max - ndvi_min) / (1 - ndvi_min), 0, 1)


def db(x: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(x, 1e-6))
