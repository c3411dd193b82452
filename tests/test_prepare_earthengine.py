"""Earth Engine extraction against a stand-in for the ``ee`` package (no account here):
unit conversions, cell geometry, table assembly in the layout of prepare samples."""

import sys
import types

import numpy as np
import pandas as pd
import pytest

from msda.grids import GRID_50M

MS = pd.Timestamp("2017-03-01").value // 10**6


class _Chain:
    """Any chained call returns the same object; getInfo returns the canned answer."""

    def __init__(self, answer=None, record=None):
        self.answer, self.record = answer, record

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if self.record is not None:
                self.record.append((name, args))
            return self

        return call

    def getInfo(self):
        return self.answer


def _fake_ee(record):
    ee = types.ModuleType("ee")
    answers = {
        "COPERNICUS/S1_GRD": [{"VV": -11.0, "VH": -17.5, "angle": 39.0}],
        "MODIS/061/MOD13Q1": [{"NDVI": 5000}],
        "ECMWF/ERA5_LAND/DAILY_AGGR": [{"temperature_2m": 283.15, "total_precipitation_sum": 0.002}],
    }

    def collection(asset):
        props = answers.get(asset, [])
        return _Chain({"features": [{"properties": {"millis": MS, **p}} for p in props]}, record)

    ee.ImageCollection = collection
    ee.Geometry = types.SimpleNamespace(Rectangle=lambda coords, proj, geodesic: record.append(("rect", coords)) or "cell")
    ee.Projection = lambda crs: crs
    ee.Filter = types.SimpleNamespace(eq=lambda *a: None, listContains=lambda *a: None)
    ee.Reducer = types.SimpleNamespace(mean=lambda: None)
    terrain = {"elevation": 300.0, "slope": 2.5, "asin": 1.0, "acos": 0.0}
    soil = {"sand": 410.0, "clay": 220.0, "bulk_density": 135.0}
    ee.Image = lambda asset: _Chain(None, record)
    ee.Image.cat = lambda images: _Chain(terrain if len(images) == 4 else soil, record)
    ee.Terrain = types.SimpleNamespace(slope=lambda d: _Chain(), aspect=lambda d: _Chain())
    return ee


@pytest.fixture
def gee(monkeypatch):
    record = []
    monkeypatch.setitem(sys.modules, "ee", _fake_ee(record))
    from msda.prepare import earthengine

    return earthengine, record


ST = pd.DataFrame({"network": ["N"], "station": ["s1"], "lon": [-97.55], "lat": [36.65]})


def test_tables_and_units(gee):
    gee_mod, record = gee
    s1 = gee_mod.sentinel1(ST, "2017-01-01", "2017-12-31")
    assert list(s1.columns) == ["network", "station", "date", "vv", "vh", "angle"]
    assert s1.iloc[0][["vv", "vh", "angle"]].tolist() == [-11.0, -17.5, 39.0]
    assert s1["date"].iloc[0] == pd.Timestamp("2017-03-01")
    daily = gee_mod.daily_series(ST, "2016-01-01", "2017-12-31")
    row = daily.iloc[0]
    assert row["ndvi"] == pytest.approx(0.5) and row["t2m"] == pytest.approx(10.0) and row["tp"] == 0.002
    static = gee_mod.static_inputs(ST)
    assert static.iloc[0]["aspect_deg"] == pytest.approx(90.0) and static.iloc[0]["sand"] == 410.0
    # the region is the station's 50 m EASE-2 cell, in metres of EPSG:6933
    coords = next(a[1] for a in record if a[0] == "rect")
    r, c = GRID_50M.lonlat_to_rowcol(-97.55, 36.65)
    assert np.allclose(coords, [float(v) for v in GRID_50M.bounds(r, c)])


def test_period_and_missing_package(monkeypatch):
    from msda.prepare import earthengine
    from msda.prepare.ismn import PrepareError

    assert earthengine.default_period("2017-03-01", "2017-10-01") == ("2016-02-26", "2017-10-02")
    monkeypatch.setitem(sys.modules, "ee", None)
    with pytest.raises(PrepareError, match=r"msda\[gee\]"):
        earthengine.sentinel1(ST, "2017-01-01", "2017-02-01")
