"""msda prepare ismn on real ISMN downloads (../shared/realdata/ismn), in both ISMN formats."""

import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from msda.grids import GRID_9KM, GRID_50M
from msda.prepare.ismn import PrepareError, read_ismn

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "ismn"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/realdata/ismn is absent (real ISMN downloads)")
SMOS = REAL / "Data_SMOSMANIA.zip"
HEADER = REAL / "Data_seperate_files_header_20170810_20180809.zip"
CEOP = REAL / "Data_seperate_files_20170810_20180809.zip"


def _stm_daily(zip_path: Path, letters: set[str]) -> pd.Series:
    """Daily means straight from the .stm text, for an independent check of the reader."""
    with zipfile.ZipFile(zip_path) as z:
        name = next(n for n in z.namelist() if n.endswith(".stm"))
        text = z.read(name).decode()
    rows = re.findall(r"(\d{4}/\d\d/\d\d) \d\d:\d\d\s+(-?[\d.]+) (\S+)", text)
    frame = pd.DataFrame(rows, columns=["day", "sm", "flag"])
    frame = frame[frame["flag"].map(lambda f: all(p[0] in letters for p in f.split(",")))]
    return frame.assign(sm=frame["sm"].astype(float)).groupby(pd.to_datetime(frame["day"]))["sm"].mean()


def test_older_download_needs_flag_u():
    with pytest.raises(PrepareError, match=r"U \(736\).*--flags G,U"):
        read_ismn(SMOS, progress=False)
    t = read_ismn(SMOS, flags=["G", "U"], progress=False)
    st = t.stations.iloc[0]
    assert (st["network"], st["station"]) == ("SMOSMANIA", "Narbonne")  # network from the file name
    assert (st["r"], st["c"]) == tuple(int(v) for v in GRID_9KM.lonlat_to_rowcol(2.9567, 43.15))
    assert (st["row_50m"], st["col_50m"]) == tuple(int(v) for v in GRID_50M.lonlat_to_rowcol(2.9567, 43.15))
    want = _stm_daily(SMOS, {"G", "U"})
    got = t.daily.set_index("date")["sm_m3m3"]
    assert len(got) == 31 and np.allclose(got.to_numpy(), want.loc[got.index].to_numpy())
    # D05 values are dropped unless asked for
    with_d = read_ismn(SMOS, flags=["G", "U", "D"], progress=False).daily.set_index("date")["sm_m3m3"]
    assert np.allclose(with_d.to_numpy(), _stm_daily(SMOS, {"G", "U", "D"}).to_numpy())
    assert not np.allclose(with_d.to_numpy(), got.to_numpy())


def test_both_formats_agree_and_depth_selects_surface():
    with pytest.raises(PrepareError, match="no surface soil moisture sensors.*0.00-0.19 m"):
        read_ismn(HEADER, progress=False)
    a = read_ismn(HEADER, max_depth=0.25, progress=False)
    b = read_ismn(CEOP, max_depth=0.25, progress=False)
    assert list(a.stations["station"]) == ["ARM-1", "Barrow-ARM"]
    pd.testing.assert_frame_equal(a.daily, b.daily)
    pd.testing.assert_frame_equal(a.stations, b.stations)
    assert a.daily["sm_m3m3"].between(0, 1).all() and (a.daily["n_sensors"] == 1).all()


def test_cli_writes_tables_and_bad_input_is_one_error(tmp_path, capsys):
    out = tmp_path / "ismn"
    code, err = run_cli(["prepare", "ismn", "-i", str(SMOS), "--flags", "G,U", "-o", str(out)], capsys)
    assert code in (0, None), err
    daily = pd.read_parquet(out / "daily.parquet")
    assert list(daily.columns[:4]) == ["network", "station", "date", "sm_m3m3"] and len(daily) == 31
    assert (out / "stations.parquet").exists() and (out / "prepare.json").exists()
    for args, message in [
        (["--networks", "SCAN"], "no network 'SCAN'"),
        (["--flags", "X"], "unknown ISMN quality flag"),
        ([], "no surface soil moisture left after keeping flags G"),
    ]:
        code, err = run_cli(["prepare", "ismn", "-i", str(SMOS), "-o", str(tmp_path / "bad"), *args], capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # beside the progress bar
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "bad").exists()
    code, err = run_cli(["prepare", "ismn", "-i", str(tmp_path / "none.zip"), "-o", str(tmp_path / "bad")], capsys)
    assert code == 2 and "none.zip" in err
