"""The generated benchmark against real-world statistics (METHOD.md section 9).

Each statistic is computed from the generated data (the tables, and for what no table holds,
the generator's own 50 m fields) and set beside its range in public records and the
literature. Nothing here looks at any method's score: the ranges come from the sources named,
so that a simulator change can be judged before any method runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from msda.metrics import scores


@dataclass(frozen=True)
class RealWorld:
    """A statistic's range in the real world, and where it comes from."""

    name: str
    description: str
    lo: float
    hi: float
    source: str


MID_WETNESS = (0.15, 0.30)  # m3/m3: where Famiglietti et al. (2008) find the largest spread

REAL_WORLD = (
    RealWorld("station_mean_sd", "SD across SCAN stations of each station's mean 0-5 cm soil moisture (m3/m3)",
              0.10, 0.18, "public SCAN in-situ records at Sentinel-1 dates, 83 stations: 0.137"),
    RealWorld("share_below_0.1", "share of SCAN 50 m samples below 0.1 m3/m3", 0.25, 0.45,
              "same records: 33 %; Zhu et al. (2025): most samples < 0.1"),
    RealWorld("median_sm", "median of SCAN 50 m samples (m3/m3)", 0.11, 0.18, "same records: 0.146"),
    RealWorld("insitu_smap_r", "in situ against 9 km SMAP, per SCAN station: median Pearson R", 0.6, 0.8,
              "Colliander et al. (2017) RSE 191; Chan et al. (2018) RSE 204"),
    RealWorld("insitu_smap_ubrmse", "in situ against 9 km SMAP, per SCAN station: median ubRMSE (m3/m3)", 0.04, 0.06,
              "Colliander et al. (2017); Chan et al. (2018)"),
    RealWorld("point_footprint_anomaly_error", "a station's point soil moisture against the mean of its 9 km "
              "cell: median ubRMSE of the daily series per station (m3/m3)", 0.02, 0.04,
              "Crow et al. (2012) Rev. Geophys. 50; Miralles et al. (2010) J. Hydrometeorol. 11"),
    RealWorld("within_cell_sd", "SD of 50 m soil moisture inside one 9 km cell at mid wetness: median over "
              f"cell-days whose cell mean is {MID_WETNESS[0]}-{MID_WETNESS[1]} m3/m3 (m3/m3)", 0.04, 0.07,
              "Famiglietti et al. (2008) WRR 44: the peak of SD against mean, at mid wetness"),
    RealWorld("vv_minus_vh_r", "per SCAN station r(VV, sm) - r(VH, sm): median (VH less sensitive than VV: > 0)",
              0.0, 1.0, "Baghdadi et al. (2017) Remote Sens. 9:969"),
    RealWorld("looks_50m", "equivalent number of looks of a 50 m Sentinel-1 cell", 15.0, 40.0,
              "ENL 4.4 per GRD resolution cell of ~20 x 22 m: about 25 at 50 m"),
)


def _per_station(frame: pd.DataFrame, a: str, b: str, min_rows: int = 5) -> pd.DataFrame:
    rows = []
    for st, g in frame.groupby("station", sort=True):
        if len(g) >= min_rows and g[a].std() > 0 and g[b].std() > 0:
            rows.append({"station": st, **scores(g[a].to_numpy(), g[b].to_numpy())})
    return pd.DataFrame(rows)


def _raw_db(frame: pd.DataFrame, name: str) -> np.ndarray:
    from msda.schema import DEFAULT_SCHEMA

    s = next(s for s in DEFAULT_SCHEMA.scalars if s.name == name)
    return s.lo + frame[name].to_numpy() * (s.hi - s.lo)


def statistics(bench, network: str = "SCAN") -> dict[str, float]:
    """Every statistic of :data:`REAL_WORLD`, computed from ``bench`` (NaN where it cannot be)."""
    fine = bench.fine.frame
    net = fine[fine["network"].astype(str) == network] if network in set(fine["network"].astype(str)) else fine
    out: dict[str, float] = {}
    out["station_mean_sd"] = float(net.groupby("station")["sm_m3m3"].mean().std(ddof=1))
    out["share_below_0.1"] = float((net["sm_m3m3"] < 0.1).mean())
    out["median_sm"] = float(net["sm_m3m3"].median())

    coarse = bench.coarse.frame[["r", "c", "date", "sm_m3m3"]].drop_duplicates(["r", "c", "date"])
    pairs = net.merge(coarse.rename(columns={"sm_m3m3": "smap"}), on=["r", "c", "date"])
    per = _per_station(pairs, "sm_m3m3", "smap")
    out["insitu_smap_r"] = float(per["r"].median()) if len(per) else np.nan
    out["insitu_smap_ubrmse"] = float(per["ubrmse"].median()) if len(per) else np.nan

    diag = bench.diagnostics
    if "station_sm_point" in diag:
        nets = bench.stations["network"].astype(str).to_numpy()
        keep = nets == network if (nets == network).any() else np.ones(len(nets), bool)
        a, b = diag["station_sm_point"][:, keep], diag["station_sm_9km"][:, keep]
        anomaly = (a - a.mean(0)) - (b - b.mean(0))
        out["point_footprint_anomaly_error"] = float(np.median(np.sqrt((anomaly**2).mean(0))))
    else:
        out["point_footprint_anomaly_error"] = np.nan
    if "within_cell_sd" in diag:
        sd, mean = np.asarray(diag["within_cell_sd"]), np.asarray(diag["within_cell_mean"])
        mid = (mean >= MID_WETNESS[0]) & (mean <= MID_WETNESS[1]) & np.isfinite(sd)
        out["within_cell_sd"] = float(np.median(sd[mid])) if mid.any() else np.nan
    else:
        out["within_cell_sd"] = np.nan

    sens = []
    for _, g in net.groupby("station"):
        if len(g) >= 5 and g["sm_m3m3"].std() > 0:
            sm = g["sm_m3m3"].to_numpy()
            sens.append(np.corrcoef(_raw_db(g, "vv"), sm)[0, 1] - np.corrcoef(_raw_db(g, "vh"), sm)[0, 1])
    out["vv_minus_vh_r"] = float(np.nanmedian(sens)) if sens else np.nan
    out["looks_50m"] = float(diag.get("looks_50m", np.nan))
    return out


def validate(bench, network: str = "SCAN") -> pd.DataFrame:
    """One row per statistic: generated value, real-world range, inside or not, source."""
    values = statistics(bench, network)
    rows = [{"statistic": rw.name, "description": rw.description, "generated": values[rw.name], "lo": rw.lo,
             "hi": rw.hi, "inside": bool(rw.lo <= values[rw.name] <= rw.hi), "source": rw.source} for rw in REAL_WORLD]
    return pd.DataFrame(rows)


def draw_validation(table: pd.DataFrame, path) -> None:
    """Each statistic as its real-world range (bar) and the generated value (dot: green inside,
    red outside), on a scale where the range spans 0-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, ax = plt.subplots(figsize=(9, 0.45 * n + 1.2))
    for i, row in enumerate(table.itertuples()):
        y = n - 1 - i
        ax.plot([0, 1], [y, y], color="0.75", lw=8, solid_capstyle="butt")
        x = (row.generated - row.lo) / (row.hi - row.lo) if np.isfinite(row.generated) else np.nan
        shown = float(np.clip(x, -1.0, 2.0)) if np.isfinite(x) else np.nan
        ax.plot(shown, y, "o", color="tab:green" if row.inside else "tab:red", ms=8)
        ax.text(2.05, y, f"{row.generated:.3g}  [{row.lo:g}, {row.hi:g}]", va="center", fontsize=8)
    ax.set_yticks(range(n), list(table["statistic"])[::-1], fontsize=8)
    ax.set_xlim(-1.05, 2.9)
    ax.set_xticks([-1, 0, 1, 2], ["lo - range", "lo", "hi", "hi + range"], fontsize=8)
    inside = int(table["inside"].sum())
    ax.set_title(f"generated benchmark against real-world ranges: {inside} of {n} inside", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
