"""Figures of a generated benchmark: station map, one station's series, VV vs soil moisture, 9 km vs 50 m."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from msda.figures import count_colorbar  # noqa: E402
from msda.schema import DEFAULT_SCHEMA  # noqa: E402


def _raw(frame: pd.DataFrame, name: str) -> np.ndarray:
    return DEFAULT_SCHEMA.denormalise_column(name, frame[name])


def draw_all(bench, out: Path) -> list[Path]:
    out = Path(out)
    paths = [out / n for n in ("stations_map.png", "station_series.png", "vv_vs_sm.png", "sm_9km_vs_50m.png")]
    st = bench.stations
    fig, ax = plt.subplots(figsize=(9, 5))
    for net, g in st.groupby("network"):
        ax.scatter(g["lon"], g["lat"], s=14, label=f"{net} ({len(g)})")
    ax.set(xlabel="longitude (deg)", ylabel="latitude (deg)", title="Synthetic stations per network")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    s = bench.series["station"]
    name = s["station"].iloc[0]
    fine = bench.fine.frame[bench.fine.frame["station"] == name]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    a1.plot(s["date"], s["sm_50m"], lw=0.8, label="50 m model")
    a1.plot(s["date"], s["smap"], ".", ms=2, label="9 km SMAP-like")
    a1.plot(fine["date"], fine["sm_m3m3"], "k.", ms=3, label="in situ on S1 dates")
    a1.set(ylabel="soil moisture (m3/m3)", title=f"{name}")
    a1.legend(fontsize=8)
    a2.plot(fine["date"], _raw(fine, "vv"), "C3.", ms=3)
    a2.set(ylabel="VV (dB)")
    fig.savefig(paths[1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    f = bench.fine.frame
    ndvi = _raw(f, "ndvi_45")
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(f["sm_m3m3"], _raw(f, "vv"), c=ndvi, s=2, cmap="YlGn", alpha=0.5)
    fig.colorbar(sc, label="NDVI (last 8-day step)")
    ax.set(xlabel="in-situ soil moisture (m3/m3)", ylabel="VV (dB)", title="VV against soil moisture (50 m)")
    fig.savefig(paths[2], dpi=110, bbox_inches="tight")
    plt.close(fig)

    c = bench.coarse.frame[["r", "c", "date", "sm_m3m3"]].rename(columns={"sm_m3m3": "smap"})
    m = f[["r", "c", "date", "sm_m3m3"]].merge(c, on=["r", "c", "date"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    *_, image = ax.hist2d(m["sm_m3m3"], m["smap"], bins=80, range=[[0, 0.5], [0, 0.5]], cmap="viridis", cmin=1)
    count_colorbar(fig, ax, image, "pairs per cell")
    ax.plot([0, 0.5], [0, 0.5], "w--", lw=1)
    ax.set(xlabel="50 m in situ (m3/m3)", ylabel="9 km SMAP-like (m3/m3)", title=f"Same cell and day ({len(m)} pairs)")
    fig.savefig(paths[3], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
