"""msda map: features from rasters, predictions per block, outputs, masks, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import rasterio
from typer.testing import CliRunner

from msda.cli import app
from msda.grids import GRID_9KM, GRID_50M
from msda.mapping import NODATA, OUT_OF_RANGE, OUT_OF_TRAINING, MapError, make_map, open_stack, open_zarr
from msda.network.model import DenseSME, MemberSpec
from msda.predict import predict
from msda.schema import DEFAULT_SCHEMA
from msda.simulate.scene import simulate_scene, to_geotiffs, write_scene
from msda.weights import save_ensemble

SHAPE = (40, 56)


@pytest.fixture(scope="module")
def scene():
    return simulate_scene(shape=SHAPE, dates=2, seed=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "weights"
    save_ensemble(DenseSME([MemberSpec(1, 8), MemberSpec(2, 16), MemberSpec(1, 32)], seed=0), path)
    return path


@pytest.fixture(scope="module")
def cube(scene, tmp_path_factory):
    return write_scene(scene, tmp_path_factory.mktemp("s") / "scene.zarr")


@pytest.fixture(scope="module")
def mapped(weights, cube, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "map"
    summary = make_map(weights, cube, out, chunks=16, progress=False)
    return out, summary


def reference_prediction(scene, weights_path) -> np.ndarray:
    """The map computed another way: a sample table of every pixel through ``predict``."""
    from msda.weights import load_ensemble

    ens = load_ensemble(weights_path)
    xx, yy = np.meshgrid(scene["x"].values, scene["y"].values)
    r9, c9 = GRID_9KM.rowcol(xx.ravel(), yy.ravel())
    out = []
    for t, day in enumerate(pd.DatetimeIndex(scene["time"].values)):
        raw = {v: scene[v].isel(time=t).values.ravel() for v in ("vv", "vh", "angle")}
        raw.update({v: scene[v].values.ravel() for v in ("sand", "clay", "bulk_density", "elevation", "slope", "aspect_deg")})
        raw.update(doy=np.full(xx.size, day.day_of_year), row_9km=r9, col_9km=c9)
        for s in ("ndvi", "t2m", "tp"):
            block = scene[s].isel(time=t).values.reshape(46, -1)
            raw.update({f"{s}_{i:02d}": block[i] for i in range(46)})
        x = DEFAULT_SCHEMA.normalise(DEFAULT_SCHEMA.encode(pd.DataFrame(raw)))
        mean = np.full(xx.size, np.nan, np.float32)
        ok = ~np.isnan(x).any(axis=1)
        mean[ok] = predict(ens, x[ok]).mean
        out.append(mean.reshape(xx.shape))
    return np.stack(out)


def test_scene_is_on_the_grid_and_in_range(scene):
    assert scene.rio.crs.to_epsg() == 6933
    assert dict(scene.sizes) == {"time": 2, "step": 46, "y": SHAPE[0], "x": SHAPE[1]}
    assert np.allclose(np.diff(scene["x"].values), GRID_50M.cell_m)
    for s in DEFAULT_SCHEMA.scalars:
        src = s.name if s.encoding is None else s.encoding.source
        if src in scene:
            v = scene[src].values
            lo, hi = (s.lo, s.hi) if s.encoding is None else (0, s.encoding.period)
            assert np.nanmin(v) >= lo - 1e-6 and np.nanmax(v) <= hi + 1e-6, src
    assert np.isnan(scene["vv"].values).any()  # the lake
    again = simulate_scene(shape=SHAPE, dates=2, seed=3)
    assert np.array_equal(scene["sm_true"].values, again["sm_true"].values, equal_nan=True)


def test_map_equals_prediction_of_the_pixels(mapped, scene, weights):
    out, summary = mapped
    maps = open_zarr(out / "maps.zarr")
    expected = reference_prediction(scene, weights)
    np.testing.assert_allclose(maps["sm_mean"].values, expected, atol=2e-5)
    assert np.array_equal(np.isnan(maps["sm_mean"].values), np.isnan(expected))
    assert (maps["sm_std"].values[~np.isnan(expected)] > 0).all()
    assert summary["pixels"] == 2 * SHAPE[0] * SHAPE[1]
    assert summary["blocks"] == 2 * 3 * 4  # 40 x 56 in blocks of 16
    lake = np.isnan(scene["vv"].values)
    assert ((maps["mask"].values & NODATA) > 0).tolist() == lake.tolist()


def test_outputs_carry_crs_and_coordinates(mapped, scene):
    out, _ = mapped
    maps = open_zarr(out / "maps.zarr")
    assert maps.rio.crs.to_epsg() == 6933
    np.testing.assert_array_equal(maps["x"].values, scene["x"].values)
    np.testing.assert_array_equal(maps["y"].values, scene["y"].values)
    day = str(pd.Timestamp(scene["time"].values[1]).date())
    with rasterio.open(out / f"sm_mean_{day}.tif") as src:
        assert src.crs.to_epsg() == 6933
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.transform.c == pytest.approx(scene["x"].values[0] - GRID_50M.cell_m / 2)
        np.testing.assert_array_equal(src.read(1), maps["sm_mean"].values[1])
    with rasterio.open(out / f"mask_{day}.tif") as src:
        assert src.dtypes[0] == "uint8"
    assert (out / f"preview_{day}.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["chunks"] == 16 and "torch" in json.dumps(summary["provenance"])


def test_block_size_does_not_change_the_map(mapped, weights, cube, tmp_path):
    out, _ = mapped
    make_map(weights, cube, tmp_path / "big", chunks=64, progress=False, cog=False, previews=False)
    a = open_zarr(out / "maps.zarr")["sm_mean"].values
    b = open_zarr(tmp_path / "big" / "maps.zarr")["sm_mean"].values
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_geotiff_folder_and_netcdf_give_the_same_map(mapped, scene, weights, tmp_path):
    out, _ = mapped
    folder = tmp_path / "tifs"
    folder.mkdir()
    to_geotiffs(scene, folder)
    assert (folder / "ndvi_2020-06-01.tif").exists() and (folder / "sand.tif").exists()
    nc = write_scene(scene, tmp_path / "scene.nc")
    ref = open_zarr(out / "maps.zarr")["sm_mean"].values
    for i, src in enumerate((folder, nc)):
        make_map(weights, src, tmp_path / f"m{i}", chunks=32, progress=False, cog=False, previews=False)
        np.testing.assert_allclose(open_zarr(tmp_path / f"m{i}" / "maps.zarr")["sm_mean"].values, ref, atol=1e-6)


def test_out_of_range_and_out_of_training_are_flagged(scene, weights, tmp_path):
    edited = scene.copy(deep=True)
    edited["vv"][0, 5, 7] = 12.0  # above the schema's 5 dB
    cube = write_scene(edited, tmp_path / "edited.zarr")
    from msda.tables import samples_from_frame

    # a training table whose elevations span only part of the scene's
    xx = np.linspace(0, 1, 10)
    frame = pd.DataFrame(np.tile(xx[:, None], (1, DEFAULT_SCHEMA.n_features)), columns=DEFAULT_SCHEMA.feature_names)
    elev = scene["elevation"].values
    frame["elevation"] = np.linspace(np.nanmin(elev), np.nanmedian(elev), 10) / 5500.0
    ids = pd.DataFrame({"network": "N", "station": [f"s{i}" for i in range(10)], "r": 1, "c": 1,
                        "date": pd.Timestamp("2020-01-01"), "lc": 1, "sm_m3m3": 0.2})
    from msda.tables import write_samples

    table = write_samples(samples_from_frame(pd.concat([ids, frame], axis=1), "fine"), tmp_path / "train.parquet")
    make_map(weights, cube, tmp_path / "m", chunks=32, progress=False, cog=False, previews=False, ranges_table=table)
    mask = open_zarr(tmp_path / "m" / "maps.zarr")["mask"].values
    assert mask[0, 5, 7] & OUT_OF_RANGE
    assert (mask & OUT_OF_RANGE).sum() == OUT_OF_RANGE  # only that pixel
    high = elev > np.nanmedian(elev) + 1.0
    flagged = (mask[1] & OUT_OF_TRAINING) > 0
    assert flagged[high].all() and not flagged[elev < np.nanmedian(elev) - 1.0].any()


def test_existing_dask_cluster_by_address(mapped, weights, cube, tmp_path):
    from dask.distributed import LocalCluster

    out, _ = mapped
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        make_map(weights, cube, tmp_path / "d", chunks=32, scheduler=cluster.scheduler_address, progress=False,
                 cog=False, previews=False)
    a = open_zarr(out / "maps.zarr")["sm_mean"].values
    np.testing.assert_allclose(open_zarr(tmp_path / "d" / "maps.zarr")["sm_mean"].values, a, atol=1e-6)


def _folder(scene, tmp_path):
    folder = tmp_path / "tifs"
    folder.mkdir()
    to_geotiffs(scene.drop_vars("sm_true"), folder)
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        ("shift", "not on the grid of"),
        ("crs", "is not EPSG:6933"),
        ("missing", "no variable 'clay'"),
        ("no_sar", "date 2020-06-13 has no Sentinel-1 'vh' raster"),
        ("bands", "'ndvi' has 45 bands, expected 46"),
    ],
)
def test_bad_folder_one_error_nothing_written(scene, weights, tmp_path, damage, message):
    folder = _folder(scene, tmp_path)
    src = folder / "slope.tif"
    with rasterio.open(src) as f:
        profile, data = f.profile, f.read()
    if damage == "shift":
        profile["transform"] = profile["transform"] @ rasterio.Affine.translation(1, 0)
        with rasterio.open(src, "w", **profile) as f:
            f.write(data)
    elif damage == "crs":
        profile["crs"] = "EPSG:4326"
        with rasterio.open(src, "w", **profile) as f:
            f.write(data)
    elif damage == "missing":
        (folder / "clay.tif").unlink()
    elif damage == "no_sar":
        (folder / "vh_2020-06-13.tif").unlink()
    elif damage == "bands":
        for p in folder.glob("ndvi_*.tif"):
            with rasterio.open(p) as f:
                prof, arr = f.profile, f.read()
            prof["count"] = 45
            with rasterio.open(p, "w", **prof) as f:
                f.write(arr[:45])
    with pytest.raises(MapError, match=message):
        make_map(weights, folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tifs"]


def test_bad_cube_one_error(scene, weights, tmp_path):
    blank = scene.copy(deep=True)
    blank["vv"][1] = np.nan
    with pytest.raises(MapError, match="date 2020-06-13 has no Sentinel-1 'vv' data"):
        open_stack(write_scene(blank, tmp_path / "blank.zarr"), DEFAULT_SCHEMA)
    with pytest.raises(MapError, match="no variable 't2m'"):
        open_stack(write_scene(scene.drop_vars("t2m"), tmp_path / "no_t2m.zarr"), DEFAULT_SCHEMA)
    wrong = scene.assign_coords(x=scene["x"].values + 10.0)
    with pytest.raises(MapError, match="not aligned with the EASE-2 50 m grid"):
        open_stack(write_scene(wrong, tmp_path / "moved.zarr"), DEFAULT_SCHEMA)


def test_cli_scene_and_demo_map(weights, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["scene", "--out", str(tmp_path / "s.zarr"), "--cells", "1x1", "--dates", "1"])
    assert res.exit_code == 0, res.output
    assert "1 dates x 180 x 180 pixels" in res.output
    res = runner.invoke(app, ["map", "-w", str(weights), "-i", "demo", "-o", str(tmp_path / "demo"),
                              "--cells", "1x1", "--dates", "1", "--no-cog"])
    assert res.exit_code == 0, res.output
    assert "against the scene's truth: RMSE" in res.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["versus_truth"][0]["n"] > 30_000
    shutil.rmtree(tmp_path / "demo")
    res = runner.invoke(app, ["map", "-w", str(weights), "-i", str(tmp_path / "none.zarr"), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no such input stack" in str(res.exception or res.output)


def test_encoded_features_may_be_given_directly(mapped, scene, weights, tmp_path):
    out, _ = mapped
    rad = np.radians(scene["aspect_deg"])
    direct = scene.drop_vars("aspect_deg").assign(aspect_sin=np.sin(rad), aspect_cos=np.cos(rad))
    cube = write_scene(direct, tmp_path / "direct.zarr")
    make_map(weights, cube, tmp_path / "m", chunks=32, progress=False, cog=False, previews=False)
    np.testing.assert_allclose(open_zarr(tmp_path / "m" / "maps.zarr")["sm_mean"].values,
                               open_zarr(out / "maps.zarr")["sm_mean"].values, atol=1e-5)


def test_calibrated_weights_map_their_interval(mapped, weights, cube, tmp_path):
    """Weights with a conformal scale (msda calibrate) add sm_lo and sm_hi: mean -+ scale x spread,
    clipped to [0, truth_max], in the store and as GeoTIFFs."""
    import json
    import shutil

    from msda.weights import MANIFEST, read_manifest

    calibrated = tmp_path / "calibrated"
    shutil.copytree(weights, calibrated)
    manifest = read_manifest(calibrated)
    manifest["calibration"] = {"level": 0.9, "scale": 1.7, "floor": 0.005}
    (calibrated / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "m"
    make_map(calibrated, cube, out, chunks=32, progress=False, previews=False)
    ds = open_zarr(out / "maps.zarr")
    mean, std, lo, hi = (ds[v].values for v in ("sm_mean", "sm_std", "sm_lo", "sm_hi"))
    half = 1.7 * np.maximum(std, 0.005)
    ok = ~np.isnan(mean)
    np.testing.assert_allclose(lo[ok], np.clip(mean - half, 0, 0.6)[ok], atol=1e-6)
    np.testing.assert_allclose(hi[ok], np.clip(mean + half, 0, 0.6)[ok], atol=1e-6)
    assert np.isnan(lo[~ok]).all() and "90%" in ds["sm_lo"].attrs["long_name"]
    assert sorted(p.name.split("_20")[0] for p in out.glob("sm_lo_*.tif")) == ["sm_lo"] * ds.sizes["time"]
    assert "sm_lo" not in open_zarr(mapped[0] / "maps.zarr").variables  # uncalibrated: no interval


def test_a_new_architecture_maps_on_the_reference_engine(scene, cube, tmp_path):
    """Kernel 7 and four convolutions: one spec, and the map runs it (on the reference modules,
    the only engine that covers it) to the same numbers as predicting its pixels."""
    from msda.network.spec import ArchSpec

    arch = ArchSpec(conv_filters=(32, 16, 8, 4), kernel=7, pools=(2, 2, 2, 2))
    path = tmp_path / "k7"
    save_ensemble(DenseSME([MemberSpec(1, 8), MemberSpec(2, 16)], seed=1, arch=arch), path)
    summary = make_map(path, cube, tmp_path / "m", chunks=32, progress=False, cog=False, previews=False, clip=False)
    maps = open_zarr(tmp_path / "m" / "maps.zarr")
    np.testing.assert_allclose(maps["sm_mean"].values, reference_prediction(scene, path), atol=2e-5)
    assert summary["pixels"] == 2 * SHAPE[0] * SHAPE[1]
