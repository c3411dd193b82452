"""SMAP L3 enhanced 9 km (SPL3SMP_E) HDF5 -> daily 9 km soil moisture at given EASE-2 cells.

Each file holds one day on the global 9 km EASE-2 grid (1624 x 3856): the descending (AM, 6 am)
retrievals in ``Soil_Moisture_Retrieval_Data_AM/soil_moisture`` and the ascending (PM) ones in
``Soil_Moisture_Retrieval_Data_PM/soil_moisture_pm``, each with its ``retrieval_qual_flag``
(bit 0 set: not of recommended quality). Only the window of rows and columns around the wanted
cells is read.

Daily value (METHOD.md section 7): the PM retrievals are bias-corrected to the AM ones by their
mean difference per cell (over the days that have both), then AM and corrected PM are averaged
per day. A cell with no day holding both keeps only its AM values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from msda.grids import GRID_9KM
from msda.prepare.ismn import PrepareError

GROUPS = {
    "am": ("Soil_Moisture_Retrieval_Data_AM", "soil_moisture", "retrieval_qual_flag"),
    "pm": ("Soil_Moisture_Retrieval_Data_PM", "soil_moisture_pm", "retrieval_qual_flag_pm"),
}
DATE_IN_NAME = re.compile(r"_(\d{8})_")  # SMAP_L3_SM_P_E_20170101_R18290_001.h5


def smap_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The .h5 files of a folder (sorted), or the given files."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.h5"))
            if not files:
                raise PrepareError(f"{path}: no SMAP .h5 files in this folder")
            return files
        if not path.exists():
            raise PrepareError(f"{path}: no such SMAP file or folder")
        return [path]
    return [Path(p) for p in path]


def _date_of(path: Path) -> pd.Timestamp:
    m = DATE_IN_NAME.search(path.name)
    if not m:
        raise PrepareError(f"{path}: no date (YYYYMMDD) in the file name, as in SMAP_L3_SM_P_E_20170101_R18290_001.h5")
    return pd.Timestamp(m.group(1))


def read_smap_day(path: Path, rows: np.ndarray, cols: np.ndarray, recommended_only: bool = True) -> dict[str, np.ndarray]:
    """AM and PM soil moisture (NaN where missing or, by default, not of recommended quality)."""
    import h5py

    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    out = {}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise PrepareError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        for key, (group, name, flag) in GROUPS.items():
            where = f"{group}/{name}"
            if where not in f:
                raise PrepareError(f"{path}: no dataset {where} (is this an SPL3SMP_E file?)")
            ds = f[where]
            if ds.shape != (GRID_9KM.n_rows, GRID_9KM.n_cols):
                raise PrepareError(f"{path}: {where} has shape {ds.shape}, not the 9 km EASE-2 grid "
                                   f"({GRID_9KM.n_rows}, {GRID_9KM.n_cols})")
            try:
                window = ds[r0:r1, c0:c1].astype(np.float64)
                fill = ds.attrs.get("_FillValue", -9999.0)
                values = window[rows - r0, cols - c0]
                values[(values == np.asarray(fill).item()) | (values < 0) | (values > 1)] = np.nan
                if recommended_only:
                    fwhere = f"{group}/{flag}"
                    if fwhere not in f:
                        raise PrepareError(f"{path}: no dataset {fwhere} (quality flags)")
                    q = f[fwhere][r0:r1, c0:c1][rows - r0, cols - c0].astype(np.int64)
                    values[(q & 1) != 0] = np.nan
            except (OSError, ValueError) as exc:
                raise PrepareError(f"{path}: cannot read {where} ({exc})") from None
            out[key] = values
    return out


def extract_smap(
    files: str | Path | Sequence[str | Path],
    cells: pd.DataFrame,
    recommended_only: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Daily SMAP at the 9 km cells ``cells[['r', 'c']]``: r, c, date, sm_am, sm_pm,
    sm_pm_corrected, sm_m3m3 (the daily value); days without any retrieval are left out."""
    from tqdm.auto import tqdm

    from msda.runtime import bar_interval

    for col in ("r", "c"):
        if col not in cells:
            raise PrepareError(f"the cell table needs columns 'r' and 'c' (9 km EASE-2 row and column); missing {col!r}")
    uniq = cells[["r", "c"]].drop_duplicates().astype(np.int64).reset_index(drop=True)
    bad = (uniq["r"] < 0) | (uniq["r"] >= GRID_9KM.n_rows) | (uniq["c"] < 0) | (uniq["c"] >= GRID_9KM.n_cols)
    if bad.any():
        r = uniq[bad].iloc[0]
        raise PrepareError(f"9 km cell (r={r['r']}, c={r['c']}) lies outside the EASE-2 9 km grid")
    rows, cols = uniq["r"].to_numpy(), uniq["c"].to_numpy()
    parts = []
    for path in tqdm(smap_files(files), desc="SMAP days", unit=" files", disable=not progress,
                     mininterval=bar_interval()):
        day = read_smap_day(path, rows, cols, recommended_only)
        parts.append(pd.DataFrame({"r": rows, "c": cols, "date": _date_of(path), "sm_am": day["am"], "sm_pm": day["pm"]}))
    table = pd.concat(parts, ignore_index=True)
    both = table.dropna(subset=["sm_am", "sm_pm"])
    shift = (both["sm_am"] - both["sm_pm"]).groupby([both["r"], both["c"]]).mean().rename("pm_shift")
    table = table.join(shift, on=["r", "c"])
    table["sm_pm_corrected"] = table["sm_pm"] + table["pm_shift"]  # NaN where the cell has no shift
    table["sm_m3m3"] = table[["sm_am", "sm_pm_corrected"]].mean(axis=1, skipna=True)
    table = table.drop(columns="pm_shift").dropna(subset=["sm_m3m3"])
    return table.sort_values(["r", "c", "date"]).reset_index(drop=True)


def smap_at_stations(input: str | Path, stations: pd.DataFrame, recommended_only: bool = True) -> pd.DataFrame:
    """SMAP L3 enhanced at the stations' 9 km cells (``r``, ``c``): network, station, r, c, date,
    AM, PM corrected to AM and the daily mean (:func:`extract_smap`)."""
    table = extract_smap(input, stations, recommended_only=recommended_only)
    ids = [c for c in ("network", "station", "r", "c") if c in stations]
    return stations[ids].merge(table, on=["r", "c"])
