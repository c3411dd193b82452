"""Samples from per-site time series: 8-day series, coincident dates, schema, errors."""

import numpy as np
import pandas as pd
import pytest

from msda.prepare.ismn import PrepareError
from msda.prepare.samples import build_samples, eight_day_series
from msda.schema import DEFAULT_SCHEMA
from msda.tables import read_samples, write_samples

DAYS = pd.date_range("2016-01-01", "2017-12-31", freq="D")


def _inputs(n_b=3):
    t = np.arange(len(DAYS))
    daily = pd.concat([pd.DataFrame({"network": "N", "station": st, "date": DAYS, "t2m": 5 + 0.02 * t,
                                     "tp": 0.01, "ndvi": np.where(t % 16 == 0, 0.3 + 0.0005 * t, np.nan)})
                       for st in ("A", "B")])
    a_dates = pd.date_range("2017-03-01", periods=8, freq="12D")
    b_dates = pd.date_range("2017-03-05", periods=n_b, freq="12D")
    sar = pd.concat([pd.DataFrame({"network": "N", "station": "A", "date": a_dates, "vv": -12.0, "vh": -18.0, "angle": 38.0}),
                     pd.DataFrame({"network": "N", "station": "B", "date": b_dates, "vv": -10.0, "vh": -16.0, "angle": 40.0})])
    truth = pd.concat([pd.DataFrame({"network": "N", "station": "A", "date": a_dates, "sm_m3m3": 0.2}),
                       pd.DataFrame({"network": "N", "station": "B", "date": b_dates, "sm_m3m3": 0.3})])
    static = pd.DataFrame({"network": "N", "station": ["A", "B"], "sand": 400.0, "clay": 200.0, "bulk_density": 140.0,
                           "elevation": 300.0, "slope": 2.0, "aspect_deg": [90.0, 180.0]})
    stations = pd.DataFrame({"network": "N", "station": ["A", "B"], "r": [300, 310], "c": [900, 910]})
    return sar, daily, static, stations, truth


def test_eight_day_windows_and_gap_filling():
    s = pd.Series(np.arange(len(DAYS), dtype=float), index=DAYS)
    d = pd.DatetimeIndex(["2017-06-01"])
    i = DAYS.get_loc(d[0])
    got = eight_day_series(s, d)[0]
    assert got[45] == pytest.approx(i - 4.5) and got[0] == pytest.approx(i - 368 + 3.5)
    assert np.allclose(np.diff(got), 8.0)
    sparse = s[::16]  # a value every 16 days: empty steps are filled from their neighbours
    filled = eight_day_series(sparse, d)[0]
    assert not np.isnan(filled).any() and np.all(np.diff(filled) >= 0)
    # the schema's step: 12-day steps reach further back
    twelve = eight_day_series(s, d, steps=46, step_days=12)[0]
    assert twelve[45] == pytest.approx(i - 6.5) and np.allclose(np.diff(twelve[20:]), 12.0)
    # gap rule: runs of up to 2 empty steps are filled, a longer run stays NaN
    holes = s.drop(s.index[(s.index >= d[0] - pd.Timedelta(days=40)) & (s.index < d[0] - pd.Timedelta(days=16))])
    got = eight_day_series(holes, d)[0]  # steps 41-43 empty (24 days): 3 > 2, kept NaN
    assert np.isnan(got[41:44]).all() and not np.isnan(got[:41]).any() and not np.isnan(got[44:]).any()
    two = s.drop(s.index[(s.index >= d[0] - pd.Timedelta(days=32)) & (s.index < d[0] - pd.Timedelta(days=16))])
    assert not np.isnan(eight_day_series(two, d)[0]).any()


def test_build_samples_fine(tmp_path):
    out = build_samples(*_inputs(), kind="fine")
    f = out.frame
    assert set(f["station"]) == {"A"} and len(f) == 8  # B has only 3 coincident dates
    row = f.iloc[0]
    i = DAYS.get_loc(row["date"])
    t2m = next(s for s in DEFAULT_SCHEMA.series if s.name == "t2m")
    assert row["t2m_45"] == pytest.approx((5 + 0.02 * (i - 4.5) - t2m.lo) / (t2m.hi - t2m.lo), rel=1e-6)
    assert row["doy_sin"] == pytest.approx((np.sin(2 * np.pi * row["date"].day_of_year / 365) + 1) / 2, abs=1e-6)
    assert row["aspect_sin"] == pytest.approx(1.0) and row["r"] == 300
    path = write_samples(out, tmp_path / "fine.parquet")
    back = read_samples(path)
    assert back.kind == "fine" and len(back) == 8


def test_build_errors():
    sar, daily, static, stations, truth = _inputs()
    with pytest.raises(PrepareError, match="no station has 9 or more"):
        build_samples(sar, daily, static, stations, truth, min_dates=9)
    with pytest.raises(PrepareError, match="station 'A' .* not in the static table"):
        build_samples(sar, daily, static[static["station"] == "B"], stations, truth)
    with pytest.raises(PrepareError, match="no column 'tp' in the daily table"):
        build_samples(sar, daily.drop(columns="tp"), static, stations, truth)
    with pytest.raises(PrepareError, match="no Sentinel-1 date coincides"):
        build_samples(sar.assign(date=pd.Timestamp("2010-01-01")), daily, static, stations, truth)
    with pytest.raises(PrepareError, match="slope"):
        build_samples(sar, daily, static.drop(columns="slope"), stations, truth)


def test_cli(tmp_path, capsys):
    from conftest import run_cli

    names = ["sar", "daily", "static", "stations", "truth"]
    for name, frame in zip(names, _inputs()):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    args = ["prepare", "samples", *sum(([f"--{n}", str(tmp_path / f"{n}.csv")] for n in names), []),
            "-o", str(tmp_path / "fine.parquet")]
    code, err = run_cli(args, capsys)
    assert code in (0, None), err
    assert len(read_samples(tmp_path / "fine.parquet")) == 8
    code, err = run_cli(args[:-1] + [str(tmp_path / "x.parquet"), "--min-dates", "20"], capsys)
    assert code == 2 and "no station has 20 or more" in err and not (tmp_path / "x.parquet").exists()


def test_prepared_tables_go_into_adapt(tmp_path, capsys):
    """fine (in situ) and coarse (SMAP) tables from prepare samples, taken by msda adapt as they are."""
    from conftest import run_cli

    from msda.network.model import DenseSME, MemberSpec
    from msda.weights import save_ensemble

    sar, daily, static, stations, truth = _inputs(n_b=8)
    extra = [t[t["station"] == "A"].assign(station="C") for t in (sar, daily, static, stations, truth)]
    sar, daily, static, stations, truth = (pd.concat([a, b]) for a, b in zip((sar, daily, static, stations, truth), extra))
    smap = truth.assign(sm_m3m3=truth["sm_m3m3"] + 0.02)
    write_samples(build_samples(sar, daily, static, stations, truth, kind="fine"), tmp_path / "fine.parquet")
    write_samples(build_samples(sar, daily, static, stations, smap, kind="coarse"), tmp_path / "coarse.parquet")
    save_ensemble(DenseSME([MemberSpec(1, 8)], seed=0), tmp_path / "w")
    code, err = run_cli(["adapt", "-w", str(tmp_path / "w"), "--fine", str(tmp_path / "fine.parquet"), "--coarse",
                         str(tmp_path / "coarse.parquet"), "--network", "N", "--stations", "1", "--epochs", "2",
                         "--batch", "4", "--average-last", "1", "-o", str(tmp_path / "run")], capsys)
    assert code in (0, None), err
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["n"].iloc[0] == 16  # the two target stations' 8 samples each
