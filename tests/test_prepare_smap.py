"""SPL3SMP_E reader on small HDF5 files with the product's group and dataset names."""

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from msda.prepare.ismn import PrepareError
from msda.prepare.smap import extract_smap

SHAPE = (1624, 3856)
CELLS = pd.DataFrame({"r": [300, 300, 420], "c": [900, 901, 1500]})


def write_day(folder: Path, date: str, am: dict, pm: dict, bad_quality: tuple = ()) -> Path:
    path = folder / f"SMAP_L3_SM_P_E_{date}_R18290_001.h5"
    with h5py.File(path, "w") as f:
        for group, name, flag, values in (("Soil_Moisture_Retrieval_Data_AM", "soil_moisture", "retrieval_qual_flag", am),
                                          ("Soil_Moisture_Retrieval_Data_PM", "soil_moisture_pm", "retrieval_qual_flag_pm", pm)):
            data = np.full(SHAPE, -9999.0, np.float32)
            q = np.zeros(SHAPE, np.uint16)
            for (r, c), v in values.items():
                data[r, c] = v
                if (group[-2:], r, c) in bad_quality:
                    q[r, c] = 1  # bit 0: not recommended quality
            ds = f.create_dataset(f"{group}/{name}", data=data, compression="gzip", chunks=(203, 482))
            ds.attrs["_FillValue"] = np.float32(-9999.0)
            f.create_dataset(f"{group}/{flag}", data=q, compression="gzip", chunks=(203, 482))
    return path


def test_pm_corrected_to_am_and_averaged(tmp_path):
    a, b, z = (300, 900), (300, 901), (420, 1500)
    write_day(tmp_path, "20170101", {a: 0.20, b: 0.30}, {a: 0.16, b: 0.25})
    write_day(tmp_path, "20170102", {a: 0.22}, {a: 0.20, b: 0.26, z: 0.4})
    write_day(tmp_path, "20170103", {a: 0.25, z: 0.1}, {a: 0.21}, bad_quality=(("PM", *a),))
    t = extract_smap(tmp_path, CELLS, progress=False).set_index(["r", "c", "date"])
    shift_a = np.mean([0.20 - 0.16, 0.22 - 0.20])  # days with both AM and PM
    day = lambda d: pd.Timestamp(d)  # noqa: E731
    assert t.loc[(*a, day("20170101")), "sm_m3m3"] == pytest.approx((0.20 + 0.16 + shift_a) / 2, abs=1e-6)
    assert t.loc[(*a, day("20170103")), "sm_m3m3"] == pytest.approx(0.25, abs=1e-6)  # PM flagged: AM only
    assert t.loc[(*b, day("20170102")), "sm_m3m3"] == pytest.approx(0.26 + (0.30 - 0.25), abs=1e-6)
    # cell z never has both: no shift, only its AM values count
    assert list(t.loc[z].index) == [day("20170103")] and t.loc[(*z, day("20170103")), "sm_m3m3"] == pytest.approx(0.1)
    assert len(t) == 3 + 2 + 1
    keep_all = extract_smap(tmp_path, CELLS, recommended_only=False, progress=False).set_index(["r", "c", "date"])
    assert np.isfinite(keep_all.loc[(*a, day("20170103")), "sm_pm"])


def test_bad_files_are_one_clear_error(tmp_path):
    (tmp_path / "SMAP_L3_SM_P_E_20170101_R18290_001.h5").write_bytes(b"not hdf5")
    with pytest.raises(PrepareError, match="20170101_R18290_001.h5: not a readable HDF5"):
        extract_smap(tmp_path, CELLS, progress=False)
    other = tmp_path / "o"
    other.mkdir()
    with h5py.File(other / "SMAP_L3_SM_P_E_20170101_R18290_001.h5", "w") as f:
        f.create_dataset("Soil_Moisture_Retrieval_Data_AM/soil_moisture", data=np.zeros((10, 10)))
    with pytest.raises(PrepareError, match="shape"):
        extract_smap(other, CELLS, progress=False)
    with pytest.raises(PrepareError, match="outside the EASE-2 9 km grid"):
        extract_smap(other, pd.DataFrame({"r": [5000], "c": [1]}), progress=False)
    with pytest.raises(PrepareError, match="no SMAP .h5 files"):
        extract_smap(tmp_path / "o2" if (tmp_path / "o2").mkdir() is None else None, CELLS, progress=False)


def test_cli_joins_stations(tmp_path, capsys):
    from conftest import run_cli

    write_day(tmp_path, "20170101", {(300, 900): 0.2}, {(300, 900): 0.18})
    st = pd.DataFrame({"network": ["N", "N"], "station": ["s1", "s2"], "r": [300, 420], "c": [900, 1500]})
    st.to_csv(tmp_path / "st.csv", index=False)
    code, err = run_cli(["prepare", "smap", "-i", str(tmp_path), "--stations", str(tmp_path / "st.csv"),
                         "-o", str(tmp_path / "smap.parquet")], capsys)
    assert code in (0, None), err
    t = pd.read_parquet(tmp_path / "smap.parquet")
    assert list(t["station"]) == ["s1"] and t["sm_m3m3"].iloc[0] == pytest.approx(0.2, abs=1e-6)  # PM shifted onto AM
    st.drop(columns="c").to_csv(tmp_path / "bad.csv", index=False)
    code, err = run_cli(["prepare", "smap", "-i", str(tmp_path), "--stations", str(tmp_path / "bad.csv"),
                         "-o", str(tmp_path / "x.parquet")], capsys)
    assert code == 2 and "no column 'c'" in err and not (tmp_path / "x.parquet").exists()
