"""Raw tables to sample tables (msda samples build, msda.build_samples) and on to weights,
calibrated predictions: the path of a user with a CSV of their own stations, no series, no 9 km data."""

import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from msda import build_samples
from msda.cli import app
from msda.errors import TableError
from msda.grids import GRID_9KM
from msda.schema import load_schema
from msda.tables import read_samples

# the schema of the stations' inputs: (name, units, lo, hi, encoding source, func, period)
INPUTS = [("vv", "dB", -30, 5, None), ("ndvi", "", -0.2, 1, None), ("precip_7d", "mm", 0, 200, None),
          ("elevation", "m", 0, 4000, None), ("doy_sin", "", -1, 1, ("doy", "sin", 365)),
          ("doy_cos", "", -1, 1, ("doy", "cos", 365)), ("row", "", 0, 1, ("row_9km", "ratio", 1624))]
SCHEMA = 'name = "own_stations"\n' + "".join(
    f'[[scalars]]\nname = "{n}"\nunits = "{u}"\nlo = {lo}\nhi = {hi}\n'
    + (f'encoding = {{source = "{e[0]}", func = "{e[1]}", period = {e[2]}}}\n' if e else "")
    for n, u, lo, hi, e in INPUTS)


def raw_table(n_stations: int = 12, per_station: int = 40, seed: int = 0) -> pd.DataFrame:
    """Stations with a soil moisture that VV, NDVI and rain explain (plus noise), in raw units."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_stations):
        lat, lon, elev = rng.uniform(32, 45), rng.uniform(-110, -85), rng.uniform(100, 1500)
        dates = pd.Timestamp("2019-01-05") + pd.to_timedelta(np.sort(rng.choice(700, per_station, replace=False)), "D")
        rain = rng.gamma(0.6, 15, per_station)
        ndvi = 0.3 + 0.3 * np.sin(2 * np.pi * (dates.day_of_year - 100) / 365) + rng.normal(0, 0.05, per_station)
        sm = np.clip(0.05 + 0.003 * rain + 0.15 * ndvi + rng.normal(0, 0.01, per_station), 0.02, 0.5)
        vv = -18 + 35 * (sm - 0.2) + 4 * ndvi + rng.normal(0, 1.0, per_station)
        rows.append(pd.DataFrame({"station": f"S{k:02d}", "network": "MINE", "date": dates.strftime("%Y-%m-%d"),
                                  "lat": lat, "lon": lon, "vv": vv, "ndvi": ndvi, "precip_7d": rain,
                                  "elevation": elev, "sm": sm, "lc": 10}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "own.toml"
    path.write_text(SCHEMA)
    return path


def test_build_samples_derives_and_normalises(schema_file):
    schema = load_schema(schema_file)
    raw = raw_table()
    s = build_samples(raw, schema, "fine", truth="sm")
    f = s.frame
    assert len(s) == len(raw) and s.schema.n_series == 0
    r, c = GRID_9KM.lonlat_to_rowcol(raw["lon"].to_numpy(), raw["lat"].to_numpy())
    assert (f["r"].to_numpy() == r).all() and (f["c"].to_numpy() == c).all()
    np.testing.assert_allclose(f["vv"], (raw["vv"].clip(-30, 5) + 30) / 35, rtol=1e-6)
    doy = pd.to_datetime(raw["date"]).dt.day_of_year
    np.testing.assert_allclose(f["doy_sin"], (np.sin(2 * np.pi * doy / 365) + 1) / 2, atol=1e-6)
    np.testing.assert_allclose(f["row"], r / 1624, atol=1e-6)
    assert (f["sm_m3m3"].to_numpy() == raw["sm"].to_numpy()).all()
    assert {"lat", "lon", "lc"} <= set(f.columns) and "sm" not in f.columns  # passed through; truth renamed


def test_build_samples_errors_name_the_problem(schema_file):
    schema = load_schema(schema_file)
    raw = raw_table(2, 5)
    with pytest.raises(TableError, match="divide percent values by 100"):
        build_samples(raw.assign(sm=raw["sm"] * 100), schema, "fine", truth="sm")
    with pytest.raises(TableError, match="no truth column 'soil'"):
        build_samples(raw, schema, "fine", truth="soil")
    with pytest.raises(TableError, match="lack column 'precip_7d'"):
        build_samples(raw.drop(columns="precip_7d"), schema, "fine", truth="sm")
    with pytest.raises(TableError, match="no location"):
        build_samples(raw.drop(columns=["lat", "lon"]), schema, "fine", truth="sm")
    with pytest.raises(TableError, match="no valid lat / lon"):
        build_samples(raw.assign(lat=np.r_[95.0, raw["lat"].to_numpy()[1:]]), schema, "fine", truth="sm")
    with pytest.raises(TableError, match="'station' column"):
        build_samples(raw.drop(columns="station"), schema, "fine", truth="sm")
    with pytest.warns(UserWarning, match=r"vv \(1 rows outside \[-30, 5\]\)"):
        build_samples(raw.assign(vv=np.r_[12.0, raw["vv"].to_numpy()[1:]]), schema, "fine", truth="sm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_samples(raw, schema, "fine", truth="sm")  # nothing outside: no warning
    # the validation of the built table names the raw file too
    with pytest.raises(TableError, match=r"^own\.csv: .*not dates"):
        build_samples(raw.assign(date=np.r_[["someday"], raw["date"].to_numpy()[1:]]), schema, "fine", truth="sm",
                      source="own.csv")
    with pytest.raises(TableError, match=r"^own\.csv: 2 rows duplicate"):
        build_samples(pd.concat([raw, raw.iloc[:1]]), schema, "fine", truth="sm", source="own.csv")


def test_own_csv_to_calibrated_predictions(tmp_path, schema_file):
    """The documented path (docs/formats.md): raw CSV -> samples -> pretrain on 50 m labels ->
    calibrate on held-out stations -> predict with intervals."""
    raw = raw_table(n_stations=12, per_station=40)
    train = raw[raw["station"] < "S06"]
    held = raw[(raw["station"] >= "S06") & (raw["station"] < "S09")]
    test = raw[raw["station"] >= "S09"]
    for name, part in (("train", train), ("held", held), ("test", test)):
        part.to_csv(tmp_path / f"{name}.csv", index=False)
    run = CliRunner().invoke
    for name in ("train", "held", "test"):
        r = run(app, ["samples", "build", "--raw", str(tmp_path / f"{name}.csv"), "--schema", str(schema_file),
                      "--kind", "fine", "--truth", "sm", "--out", str(tmp_path / f"{name}.parquet")])
        assert r.exit_code == 0, r.output
        assert "6 stations" in r.output or "3 stations" in r.output or "stations: " in r.output
    assert read_samples(tmp_path / "train.parquet").schema.name == "own_stations"
    r = run(app, ["pretrain", "--samples", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "w"),
                  "--epochs", "40", "--lr", "3e-3", "--batch", "32", "--average-last", "5", "--widths", "16", "--depths", "1,2",
                  "--threads", "1"])
    assert r.exit_code == 0, r.output
    r = run(app, ["calibrate", "--weights", str(tmp_path / "w"), "--samples", str(tmp_path / "held.parquet")])
    assert r.exit_code == 0, r.output
    r = run(app, ["predict", "--weights", str(tmp_path / "w"), "--samples", str(tmp_path / "test.parquet"),
                  "--out", str(tmp_path / "pred.parquet"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    assert {"sm_pred", "sm_lo", "sm_hi"} <= set(pred.columns)
    truth = test["sm"].to_numpy()
    rmse = float(np.sqrt(np.mean((pred["sm_pred"].to_numpy() - truth) ** 2)))
    assert rmse < np.std(truth)  # better than the climatology of the test stations
    covered = np.mean((truth >= pred["sm_lo"]) & (truth <= pred["sm_hi"]))
    assert covered > 0.6
    # and a map: the schema's inputs as GeoTIFFs on the EASE-2 50 m grid, a calibrated interval
    stack = _own_stack(tmp_path / "stack")
    r = run(app, ["map", "--weights", str(tmp_path / "w"), "--inputs", str(stack), "--out", str(tmp_path / "maps"),
                  "--threads", "1", "--no-preview"])
    assert r.exit_code == 0, r.output
    from msda.mapping import open_zarr

    ds = open_zarr(tmp_path / "maps" / "maps.zarr")
    mean, lo, hi = (ds[v].values for v in ("sm_mean", "sm_lo", "sm_hi"))
    assert mean.shape == (2, 30, 40) and np.isfinite(mean).all() and (lo <= mean).all() and (mean <= hi).all()
    assert 0.0 <= mean.min() and mean.max() <= 0.6


def _own_stack(folder):
    """vv, ndvi and precip_7d on two dates and a static elevation, 30 x 40 pixels near 38 N 98 W."""
    import xarray as xr

    from msda.grids import GRID_50M
    from msda.simulate.scene import to_geotiffs

    rng = np.random.default_rng(1)
    row0, col0 = GRID_50M.lonlat_to_rowcol(-98.2, 38.5)
    x, _ = GRID_50M.center(np.full(40, row0), col0 + np.arange(40))
    _, y = GRID_50M.center(row0 + np.arange(30), np.full(30, col0))
    shape = (2, 30, 40)
    ds = xr.Dataset(
        {"vv": (("time", "y", "x"), rng.uniform(-20, -8, shape)), "ndvi": (("time", "y", "x"), rng.uniform(0.2, 0.7, shape)),
         "precip_7d": (("time", "y", "x"), rng.gamma(0.6, 15, shape)), "elevation": (("y", "x"), rng.uniform(400, 600, shape[1:]))},
        coords={"time": pd.to_datetime(["2019-05-01", "2019-05-13"]), "y": y, "x": x})
    folder.mkdir()
    to_geotiffs(ds, folder)
    return folder
