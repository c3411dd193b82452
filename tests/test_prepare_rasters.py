"""Area-weighted aggregation onto EASE-2 cells, on GeoTIFFs written on known grids."""

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine

from msda.grids import EASE2_UL_X, EASE2_UL_Y, GRID_50M
from msda.prepare.ismn import PrepareError
from msda.prepare.rasters import aggregate_at_stations, aggregate_window

R0, C0 = 56000, 159000  # a 50 m cell in Oklahoma


def _tif(path, data, transform, crs="EPSG:6933", nodata=-9999.0):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="float32", crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data.astype(np.float32), 1)
    return path


def _aligned(tmp_path, data, shift=(0.0, 0.0)):
    """Pixels of 1/5 of a 50 m cell, starting at the corner of cell (R0-2, C0-2), shifted in pixels."""
    px = GRID_50M.cell_m / 5
    x0 = EASE2_UL_X + (C0 - 2) * GRID_50M.cell_m + shift[1] * px
    y0 = EASE2_UL_Y - (R0 - 2) * GRID_50M.cell_m - shift[0] * px
    return _tif(tmp_path / "r.tif", data, Affine(px, 0, x0, 0, -px, y0))


def test_aligned_pixels_average_and_nodata(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 100, (25, 25))
    data[10, 11] = -9999.0  # nodata inside cell (R0, C0): rows 10..14, cols 10..14
    path = _aligned(tmp_path, data)
    got = aggregate_window(path, "50m", R0, C0, 1, 1)[0, 0]
    block = data[10:15, 10:15]
    assert got == pytest.approx(block[block != -9999.0].mean(), rel=1e-5)
    win = aggregate_window(path, GRID_50M, R0 - 1, C0 - 1, 3, 3)
    assert win[1, 1] == pytest.approx(got, rel=1e-6)
    assert win[0, 0] == pytest.approx(data[5:10, 5:10].mean(), rel=1e-5)


def test_fractional_overlap_weights(tmp_path):
    data = np.arange(25 * 25, dtype=float).reshape(25, 25)
    path = _aligned(tmp_path, data, shift=(0.5, 0.5))  # pixel edges halfway inside the cell
    got = aggregate_window(path, "50m", R0, C0, 1, 1)[0, 0]
    # the cell covers pixel rows 9.5..14.5 and cols 9.5..14.5: edge pixels weigh half, corners a quarter
    w = np.ones(6)
    w[0] = w[-1] = 0.5
    weights = np.outer(w, w)
    want = (data[9:15, 9:15] * weights).sum() / weights.sum()
    assert got == pytest.approx(want, rel=1e-4)


def test_angles_and_other_crs(tmp_path):
    aspect = np.where(np.arange(25)[None, :] % 2 == 0, 350.0, 10.0).repeat(25, axis=0)
    got = aggregate_window(_aligned(tmp_path, aspect), "50m", R0, C0, 1, 1, angle=True)[0, 0]
    block = np.deg2rad(aspect[10:15, 10:15])
    want = np.rad2deg(np.arctan2(np.sin(block).mean(), np.cos(block).mean())) % 360
    assert got == pytest.approx(want, abs=1e-3) and want > 350  # near north, not the 170 of a plain mean
    geo = _tif(tmp_path / "geo.tif", np.full((1000, 1000), 7.0), Affine(0.001, 0, -98.0, 0, -0.001, 37.0), crs="EPSG:4326")
    st = pd.DataFrame({"station": ["s1", "s2"], "lon": [-97.55, -97.56], "lat": [36.65, 36.64]})
    assert aggregate_at_stations(geo, st, "50m").to_list() == pytest.approx([7.0, 7.0])
    assert aggregate_at_stations(geo, st.iloc[:1], "9km").iloc[0] == pytest.approx(7.0)
    far = pd.DataFrame({"station": ["far"], "lon": [-90.0], "lat": [40.0]})
    with pytest.raises(PrepareError, match="station 'far'.*outside"):
        aggregate_at_stations(geo, far, "50m")


def test_bad_rasters(tmp_path):
    data = np.ones((25, 25))
    px = GRID_50M.cell_m / 5
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", driver="GTiff", width=25, height=25, count=1, dtype="float32",
                       transform=Affine(px, 0, 0, 0, -px, 0)) as dst:
        dst.write(data.astype(np.float32), 1)
    with pytest.raises(PrepareError, match="no CRS"):
        aggregate_window(nocrs, "50m", R0, C0, 1, 1)
    with pytest.raises(PrepareError, match="no band 2"):
        aggregate_window(_aligned(tmp_path, data), "50m", R0, C0, 1, 1, band=2)
    with pytest.raises(PrepareError, match="cannot open"):
        aggregate_window(tmp_path / "missing.tif", "50m", R0, C0, 1, 1)


def test_static_cli(tmp_path, capsys):
    from conftest import run_cli

    geo = _tif(tmp_path / "sand.tif", np.full((1000, 1000), 412.0), Affine(0.001, 0, -98.0, 0, -0.001, 37.0), crs="EPSG:4326")
    pd.DataFrame({"network": "N", "station": ["s1"], "lon": [-97.55], "lat": [36.65]}).to_csv(tmp_path / "st.csv", index=False)
    code, err = run_cli(["prepare", "static", "--stations", str(tmp_path / "st.csv"), "--raster", f"sand={geo}",
                         "--raster", f"aspect_deg={geo}:angle", "-o", str(tmp_path / "static.csv")], capsys)
    assert code in (0, None), err
    t = pd.read_csv(tmp_path / "static.csv")
    assert t["sand"].iloc[0] == pytest.approx(412.0) and t["aspect_deg"].iloc[0] == pytest.approx(52.0, abs=1e-3)
    code, err = run_cli(["prepare", "static", "--stations", str(tmp_path / "st.csv"), "--raster", f"sand={geo}:band3",
                         "-o", str(tmp_path / "x.csv")], capsys)
    assert code == 2 and "no band 3" in err and not (tmp_path / "x.csv").exists()


def test_series_from_dated_rasters(tmp_path):
    from msda.prepare.rasters import series_from_rasters

    files = []
    for i, day in enumerate(["2017-03-01", "2017-03-13"]):
        data = np.full((1000, 1000), -12.0 - i)
        if i == 1:
            data[300:400, 400:500] = -9999.0  # s2 under nodata on the second date
        files.append(_tif(tmp_path / f"S1_VV_{day.replace('-', '')}.tif", data,
                          Affine(0.001, 0, -98.0, 0, -0.001, 37.0), crs="EPSG:4326"))
    st = pd.DataFrame({"network": "N", "station": ["s1", "s2"], "lon": [-97.8, -97.55], "lat": [36.8, 36.65]})
    t = series_from_rasters(files, st, "vv", progress=False)
    assert list(zip(t["station"], t["date"].dt.strftime("%m-%d"), t["vv"])) == [
        ("s1", "03-01", -12.0), ("s2", "03-01", -12.0), ("s1", "03-13", -13.0)]
    with pytest.raises(PrepareError, match="station 's2': only nodata"):
        series_from_rasters(files, st, "vv", skip_nodata=False, progress=False)
    bad = _tif(tmp_path / "S1_VV.tif", np.ones((10, 10)), Affine(0.001, 0, -98.0, 0, -0.001, 37.0), crs="EPSG:4326")
    with pytest.raises(PrepareError, match="no date"):
        series_from_rasters([bad], st, "vv", progress=False)


def test_netcdf_and_cog_read_alike(tmp_path):
    data = np.random.default_rng(1).uniform(0, 50, (25, 25))
    tif = _aligned(tmp_path, data)
    from rasterio.shutil import copy as gdal_copy  # GDAL's CreateCopy: these formats are not written in place

    for driver, name in (("netCDF", "r.nc"), ("COG", "r_cog.tif")):
        gdal_copy(tif, tmp_path / name, driver=driver)
        got = aggregate_window(tmp_path / name, "50m", R0, C0, 1, 1)[0, 0]
        assert got == pytest.approx(data[10:15, 10:15].mean(), rel=1e-5), driver
