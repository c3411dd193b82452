import json

import numpy as np
import pandas as pd
import pytest

from msda.errors import MsdaError
from msda.schema import DEFAULT_SCHEMA
from msda.simulate import NETWORKS, SimConfig, simulate, write_benchmark
from msda.simulate import physics
from msda.tables import read_samples


@pytest.fixture(scope="module")
def bench():
    return simulate(SimConfig(scale=0.1, seed=11, pretrain_cells=60))


def _raw(frame, name):
    return DEFAULT_SCHEMA.denormalise_column(name, frame[name])


def test_deterministic():
    a = simulate(SimConfig(scale=0.03, seed=5, pretrain_cells=20))
    b = simulate(SimConfig(scale=0.03, seed=5, pretrain_cells=20))
    c = simulate(SimConfig(scale=0.03, seed=6, pretrain_cells=20))
    pd.testing.assert_frame_equal(a.fine.frame, b.fine.frame)
    pd.testing.assert_frame_equal(a.pretrain.frame, b.pretrain.frame)
    assert not a.fine.frame["sm_m3m3"].equals(c.fine.frame["sm_m3m3"])


def test_counts_per_network(bench):
    st = bench.stations.groupby("network").size()
    fine = bench.fine.frame.groupby("network").size()
    coarse = bench.coarse.frame.groupby("network").size()
    for net, spec in NETWORKS.items():
        n = max(1, round(spec.stations * 0.1))
        assert st[net] == n
        assert fine[net] == pytest.approx(spec.fine_samples * n / spec.stations, rel=0.1)
        assert coarse[net] == pytest.approx(spec.coarse_samples * n / spec.stations, rel=0.1)
    # every station has more than 5 Sentinel-1 dates; one 50 m cell per station
    assert bench.fine.frame.groupby("station").size().min() > 5
    assert not bench.stations.duplicated(["row_50m", "col_50m"]).any()


def test_full_size_counts_from_table2():
    """The full default sizes match Table 2 within 10 % (counted by construction, no simulation)."""
    assert sum(s.stations for s in NETWORKS.values()) == 480
    assert sum(s.fine_samples for s in NETWORKS.values()) == 66547


def test_placement(bench):
    st = bench.stations
    assert st.loc[st.network == "PBO_H2O", "lon"].max() < -103.9
    for net in ("SCAN", "USCRN"):
        lons = st.loc[st.network == net, "lon"]
        assert lons.min() < -110 and lons.max() > -85
    arm = st[st.network == "ARM"]
    assert (np.hypot(arm.lon + 97.5, arm.lat - 36.6) < 1.3).all()
    # real EASE-2 9 km indices of CONUS
    assert st["r"].between(200, 700).all() and st["c"].between(300, 1300).all()


def test_layout_valid_and_written(tmp_path, bench):
    write_benchmark(bench, tmp_path / "pq")
    write_benchmark(bench, tmp_path / "csv", fmt="csv")
    f = read_samples(tmp_path / "pq" / "fine.parquet")
    c = read_samples(tmp_path / "csv" / "input_9km.csv")
    assert f.kind == "fine" and c.kind == "coarse"
    assert len(f) == len(bench.fine) and len(c) == len(bench.coarse)
    assert (tmp_path / "csv" / "input_fine.csv").exists()
    meta = json.loads((tmp_path / "pq" / "settings.json").read_text())
    assert meta["seed"] == 11 and meta["counts"]["fine"] == len(bench.fine)
    x = f.features()
    assert x.min() >= 0 and x.max() <= 1


def test_dry_climates_drier(bench):
    """Stations in the driest third of annual precipitation read drier than those in the wettest."""
    means = bench.fine.frame.groupby("station")["sm_m3m3"].mean()
    rain = bench.stations.set_index("station").loc[means.index, "annual_precip_mm"]
    lo, hi = rain.quantile([1 / 3, 2 / 3])
    assert means[rain <= lo].mean() < means[rain >= hi].mean() - 0.01


def test_two_scales_differ(bench):
    """The mismatch the method exists for: land-cover mixtures, rain below 9 km and probes make
    a station's series differ from its 9 km cell's, and SMAP from both."""
    st = bench.stations
    assert set(st["land_cover"]) <= {"grass", "crop"}
    assert st["probe_gain"].std() > 0.05
    d = bench.diagnostics
    anomaly = (d["station_sm_point"] - d["station_sm_point"].mean(0)) - (d["station_sm_9km"] - d["station_sm_9km"].mean(0))
    assert np.median(np.sqrt((anomaly**2).mean(0))) > 0.015
    lc = set(bench.coarse.frame["lc"]) | set(bench.pretrain.frame["lc"])
    assert len(lc) >= 3  # 9 km cells dominated by different classes


def test_smap_errors_grow_with_vegetation():
    from msda.simulate.physics import vegetation_water_content

    ndvi = np.array([0.2, 0.5, 0.8])
    vwc = vegetation_water_content(ndvi, np.full(3, 0.1), np.full(3, 0.85), np.full(3, 3.5))
    assert np.all(np.diff(vwc) > 0) and vwc[0] > 0


def test_vv_sensitivity_falls_with_ndvi():
    """Oh + Water Cloud: VV rises with soil moisture, and the slope is flatter under dense vegetation."""
    theta = np.linspace(0.05, 0.4, 20)
    angle = np.full_like(theta, 38.0)
    rms = np.full_like(theta, 1.2)
    vv_soil, _ = physics.oh_bare_soil(theta, angle, rms)
    slopes = []
    for ndvi in (0.1, 0.8):
        vv = physics.db(physics.water_cloud(vv_soil, np.full_like(theta, ndvi), angle, a=0.12, b=0.9))
        assert np.all(np.diff(vv) > 0)
        slopes.append(np.polyfit(theta, vv, 1)[0])
    assert slopes[1] < 0.6 * slopes[0]


def test_vv_sm_relation_in_samples(bench):
    f = bench.fine.frame
    ndvi = _raw(f, "ndvi_45")
    vv = _raw(f, "vv")
    sm = f["sm_m3m3"].to_numpy()
    low, high = ndvi < np.quantile(ndvi, 0.25), ndvi > np.quantile(ndvi, 0.75)
    slope_low = np.polyfit(sm[low], vv[low], 1)[0]
    slope_high = np.polyfit(sm[high], vv[high], 1)[0]
    assert np.corrcoef(sm[low], vv[low])[0, 1] > 0.3
    assert slope_high < slope_low


def test_scales_correlate_but_differ_in_level(bench):
    f = bench.fine.frame[["network", "station", "r", "c", "date", "sm_m3m3"]]
    c = bench.coarse.frame[["r", "c", "date", "sm_m3m3"]].rename(columns={"sm_m3m3": "smap"})
    m = f.merge(c, on=["r", "c", "date"])
    per = m.groupby("station").filter(lambda g: len(g) >= 15).groupby("station")
    r = per.apply(lambda g: np.corrcoef(g.sm_m3m3, g.smap)[0, 1])
    bias = per.apply(lambda g: (g.smap - g.sm_m3m3).mean())
    assert len(r) >= 10
    assert r.median() > 0.5
    assert (bias.abs() > 0.02).mean() > 0.3


def test_cosby_and_topp_values():
    h = physics.cosby_hydraulics(np.array([92.0, 40.0, 10.0]), np.array([3.0, 20.0, 45.0]))
    assert np.all(h["wilting_point"] < h["field_capacity"]) and np.all(h["field_capacity"] < h["porosity"])
    assert h["porosity"][0] == pytest.approx((50.5 - 0.142 * 92 - 0.037 * 3) / 100)
    assert h["field_capacity"][2] > h["field_capacity"][0]  # clay holds more water than sand
    assert physics.topp_permittivity(np.array([0.0]))[0] == pytest.approx(3.03)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (SimConfig(scale=0), "--scale must be > 0"),
        (SimConfig(networks=("SCAN", "NOPE")), r"unknown network\(s\) \['NOPE'\]"),
        (SimConfig(start="2018-01-01", end="2017-01-01"), "empty date range"),
    ],
)
def test_bad_input(cfg, match):
    with pytest.raises(MsdaError, match=match):
        simulate(cfg)


def test_unwritable_output(tmp_path, bench):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MsdaError, match="not a directory"):
        write_benchmark(bench, tmp_path / "file")
    with pytest.raises(MsdaError, match="cannot write here"):
        write_benchmark(bench, tmp_path / "file" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_plots(tmp_path, bench):
    from msda.simulate.plots import draw_all

    paths = draw_all(bench, tmp_path)
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_validation_statistics_on_known_data():
    from types import SimpleNamespace

    from msda.simulate.validate import REAL_WORLD, statistics, validate

    dates = pd.date_range("2020-01-01", periods=20, freq="12D")
    rng = np.random.default_rng(0)
    rows = []
    for st, (level, r) in {"a": (0.05, 300), "b": (0.25, 301), "c": (0.35, 302)}.items():
        sm = level + 0.03 * np.sin(np.arange(20))
        vv = 0.5 + 2.0 * sm + rng.normal(0, 0.01, 20)  # normalised VV: follows sm closely
        vh = 0.5 + 2.0 * sm + rng.normal(0, 0.05, 20)  # VH: noisier, less sensitive
        rows.append(pd.DataFrame({"network": "SCAN", "station": st, "r": r, "c": 700, "date": dates, "sm_m3m3": sm,
                                  "vv": vv, "vh": vh}))
    fine = pd.concat(rows, ignore_index=True)
    coarse = fine[["r", "c", "date"]].assign(sm_m3m3=fine["sm_m3m3"] + 0.02 + 0.01 * np.cos(np.arange(60)))
    days = 30
    a = np.tile(np.linspace(0.1, 0.3, days)[:, None], (1, 3))
    diag = {"station_sm_point": a + 0.03 * np.sin(np.arange(days))[:, None], "station_sm_9km": a,
            "within_cell_sd": np.array([[0.01, 0.05, 0.06, 0.09]]), "within_cell_mean": np.array([[0.2, 0.2, 0.25, 0.4]]),
            "looks_50m": 25.0}
    bench = SimpleNamespace(fine=SimpleNamespace(frame=fine), coarse=SimpleNamespace(frame=coarse),
                            stations=pd.DataFrame({"network": ["SCAN"] * 3}), diagnostics=diag)
    got = statistics(bench)
    means = fine.groupby("station")["sm_m3m3"].mean()
    assert got["station_mean_sd"] == pytest.approx(means.std(ddof=1))
    assert got["share_below_0.1"] == pytest.approx((fine["sm_m3m3"] < 0.1).mean())
    assert got["median_sm"] == pytest.approx(fine["sm_m3m3"].median())
    want_ub = np.std(0.01 * np.cos(np.arange(20)))  # the same in each station's 20 rows
    assert got["insitu_smap_ubrmse"] == pytest.approx(want_ub, rel=0.2)
    assert got["point_footprint_anomaly_error"] == pytest.approx(np.std(0.03 * np.sin(np.arange(days))), rel=1e-6)
    assert got["within_cell_sd"] == pytest.approx(0.05)
    assert got["vv_minus_vh_r"] > 0 and got["looks_50m"] == 25.0
    table = validate(bench)
    assert list(table["statistic"]) == [rw.name for rw in REAL_WORLD]
    assert table.set_index("statistic").loc["within_cell_sd", "inside"]
    assert (table["inside"] == ((table["generated"] >= table["lo"]) & (table["generated"] <= table["hi"]))).all()


def test_benchmark_writes_its_validation(tmp_path):
    bench = simulate(SimConfig(scale=0.03, seed=1, networks=("SCAN",), pretrain_cells=20))
    write_benchmark(bench, tmp_path / "b")
    record = json.loads((tmp_path / "b" / "validation.json").read_text())
    names = [s["statistic"] for s in record["statistics"]]
    assert "within_cell_sd" in names and all(isinstance(s["inside"], bool) for s in record["statistics"])
    assert (tmp_path / "b" / "validation.png").stat().st_size > 10_000
