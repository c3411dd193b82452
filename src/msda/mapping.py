"""50 m soil moisture maps with uncertainty from a DenseSM-E and a stack of input rasters.

Inputs: the schema's variables in raw units on the EASE-2 50 m grid (EPSG:6933), either

- one cube (Zarr store, NetCDF file) with dimensions ``time`` (Sentinel-1 dates), ``y``, ``x``
  and, for the series, ``step`` (the schema's 46 8-day steps, 0 the oldest); a variable without
  ``time`` is static; or
- a folder of GeoTIFFs: ``<variable>.tif`` for static layers, ``<variable>_<YYYY-MM-DD>.tif``
  (or YYYYMMDD) for dated ones; a series is one file with one band per step.

Features come from the variables by name; an encoded feature from its source (``aspect_deg``
for aspect sin/cos); ``doy`` comes from the date and the 9 km row/column from the pixels'
position on the grid. Everything else in the inputs is ignored.

The map is cut into blocks of ``chunks`` x ``chunks`` pixels per date; each block is one Dask
task that reads its windows, builds the features, predicts with every member and writes its
window of the Zarr output, so memory depends on the block size, not on the area. Local runs
use Dask's threaded scheduler; ``scheduler=ADDRESS`` runs the same tasks on a distributed
cluster (its workers must see the input, weights and output paths).

Outputs in ``out/``: ``maps.zarr`` (sm_mean, sm_std, mask over time, y, x, with CRS), per date
``sm_mean_<date>.tif``, ``sm_std_<date>.tif``, ``mask_<date>.tif`` (Cloud-Optimized GeoTIFFs)
and ``preview_<date>.png``, and ``summary.json`` (per-date statistics, speed, provenance).
The mask holds bit flags: 1 = an input is nodata (no prediction), 2 = an input lies outside the
schema's range (the model saw it clipped), 4 = outside the range of the training samples
(``ranges``, optional), 8 = the mean was clipped to [0, the schema's truth_max] (``clip``).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from msda.errors import MsdaError
from msda.grids import CRS, EASE2_UL_X, EASE2_UL_Y, GRID_9KM, GRID_50M
from msda.io import atomic_path, check_output
from msda.predict import CLIPPED, FLAG_MEANINGS, NODATA, OUT_OF_RANGE, OUT_OF_TRAINING
from msda.runtime import bar_interval, release_memory
from msda.schema import FeatureSchema

DERIVED = ("doy", "row_9km", "col_9km")  # encoding sources computed from the date and position
SAR = ("vv", "vh", "angle")
_TOL = 1e-6  # normalised units: values this far outside [lo, hi] count as in range


class MapError(MsdaError):
    """Map inputs that cannot be used: grids, CRS, missing variables or dates."""


# ----- the input stack ------------------------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    """A description of the inputs that every worker can open: no open files, only paths."""

    source: str
    kind: str  # "cube" or "folder"
    times: tuple[pd.Timestamp, ...]
    height: int
    width: int
    row0: int  # first 50 m row and column of the stack on the global grid
    col0: int
    dated: dict[str, bool]  # variable -> has a time dimension
    files: dict[tuple[str, str], str] = field(default_factory=dict)  # (variable, date or "") -> file

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre x and y (m, EPSG:6933)."""
        x, _ = GRID_50M.center(0, np.arange(self.col0, self.col0 + self.width))
        _, y = GRID_50M.center(np.arange(self.row0, self.row0 + self.height), 0)
        return np.asarray(x), np.asarray(y)

    def read(self, var: str, t: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """One window as float32, nodata as NaN: (rows, cols) or (steps, rows, cols)."""
        if self.kind == "cube":
            da = _open_cube(self.source)[var]
            sel = {"y": slice(y0, y1), "x": slice(x0, x1)}
            if "time" in da.dims:
                sel["time"] = t
            da = da.isel(sel)
            order = [d for d in ("step", "y", "x") if d in da.dims]
            return np.asarray(da.transpose(*order).values, dtype=np.float32)
        import rasterio
        from rasterio.windows import Window

        key = (var, str(self.times[t].date()) if self.dated[var] else "")
        with rasterio.open(self.files[key]) as src:
            arr = src.read(window=Window(x0, y0, x1 - x0, y1 - y0), masked=True).astype(np.float32)
        arr = arr.filled(np.nan)
        return arr[0] if arr.shape[0] == 1 else arr


def open_zarr(path: str | Path):
    """A Zarr store as a lazy xarray Dataset (no Dask), with or without consolidated metadata."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*consolidated.*")
        return xr.open_zarr(path, chunks=None, consolidated=None, decode_coords="all")


@functools.lru_cache(maxsize=4)
def _open_cube(path: str):
    import xarray as xr

    if Path(path).is_dir():
        return open_zarr(path)
    return xr.open_dataset(path, chunks=None)


def _grid_origin(transform, crs, where: str) -> tuple[int, int]:
    """First row and column on the EASE-2 50 m grid of a raster, or a MapError naming ``where``."""
    from rasterio.crs import CRS as RioCRS

    if crs is None:
        raise MapError(f"{where}: no CRS; the inputs must be on the EASE-2 50 m grid ({CRS})")
    if RioCRS.from_user_input(crs) != RioCRS.from_user_input(CRS):
        raise MapError(f"{where}: CRS {RioCRS.from_user_input(crs).to_string()} is not {CRS} (EASE-Grid 2.0); "
                       f"reproject onto the 50 m grid, e.g. gdalwarp -t_srs {CRS} -tr {GRID_50M.cell_m:.6f} "
                       f"{GRID_50M.cell_m:.6f} -tap")
    a, b, c, d, e, f = transform[:6]
    cell = GRID_50M.cell_m
    if b or d or abs(a - cell) > 1e-3 or abs(e + cell) > 1e-3:
        raise MapError(f"{where}: pixels of {a:g} x {-e:g} m are not the EASE-2 50 m cells ({cell:.4f} m, north up)")
    col, row = (c - EASE2_UL_X) / cell, (EASE2_UL_Y - f) / cell
    if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
        raise MapError(f"{where}: the pixels are not aligned with the EASE-2 50 m grid "
                       f"(corner at column {col:.3f}, row {row:.3f}); reproject with -tap")
    return int(round(row)), int(round(col))


def _needed(schema: FeatureSchema, have: set[str]) -> tuple[list[str], list[str]]:
    """The scalar variables to read from a stack holding ``have``, and the series names."""
    scalars = []
    for var, _ in _scalar_source(schema, have):
        if var not in DERIVED and var not in scalars:
            scalars.append(var)
    return scalars, [s.name for s in schema.series]


def _scalar_source(schema: FeatureSchema, have: set[str]) -> list[tuple[str, object]]:
    """For each scalar feature: (variable to read or derived source, encoding or None)."""
    out = []
    for s in schema.scalars:
        if s.name in have:
            out.append((s.name, None))
        elif s.encoding is not None:
            out.append((s.encoding.source, s.encoding))
        else:
            out.append((s.name, None))
    return out


def _check_variables(stack_vars: dict[str, tuple], schema: FeatureSchema, where: str, hint) -> None:
    """``stack_vars``: variable -> (dims...). Missing variables and wrong layouts are errors."""
    have = set(stack_vars)
    for s in schema.scalars:
        if s.name in have or (s.encoding is not None and (s.encoding.source in have or s.encoding.source in DERIVED)):
            continue
        want = s.encoding.source if s.encoding is not None else s.name
        raise MapError(f"{where}: no variable {want!r} (for input {s.name!r} of schema {schema.name!r}){hint(want)}")
    for name in (s.name for s in schema.series):
        if name not in have:
            raise MapError(f"{where}: no variable {name!r} (a series of schema {schema.name!r}){hint(name)}")
    for v in SAR:
        if v in have and "time" not in stack_vars[v]:
            raise MapError(f"{where}: {v!r} has no time dimension; Sentinel-1 inputs are dated")


def open_stack(path: str | Path, schema: FeatureSchema) -> Stack:
    """Check the inputs at ``path`` (a cube or a folder of GeoTIFFs) and describe them."""
    path = Path(path)
    if not path.exists():
        raise MapError(f"{path}: no such input stack")
    _open_cube.cache_clear()  # a file rewritten since it was last opened in this process
    if path.is_dir() and not _is_zarr(path):
        return _open_folder(path, schema)
    return _open_cube_stack(path, schema)


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()


def _open_cube_stack(path: Path, schema: FeatureSchema) -> Stack:
    try:
        ds = _open_cube(str(path))
    except Exception as exc:  # noqa: BLE001  (xarray raises many kinds for unreadable files)
        raise MapError(f"{path}: cannot open as Zarr or NetCDF ({exc})") from None
    for dim in ("y", "x"):
        if dim not in ds.dims:
            raise MapError(f"{path}: no dimension {dim!r} (the cube needs time, y, x and step for series)")
    crs = None
    if "spatial_ref" in ds.variables:
        crs = ds["spatial_ref"].attrs.get("crs_wkt") or ds["spatial_ref"].attrs.get("spatial_ref")
    crs = crs or ds.attrs.get("crs")
    x, y = ds["x"].to_numpy(), ds["y"].to_numpy()
    if len(x) < 1 or len(y) < 1:
        raise MapError(f"{path}: empty x or y")
    cell = GRID_50M.cell_m
    dx = float(np.diff(x).mean()) if len(x) > 1 else cell
    dy = float(np.diff(y).mean()) if len(y) > 1 else -cell
    if len(x) > 2 and np.ptp(np.diff(x)) > 1e-3 or len(y) > 2 and np.ptp(np.diff(y)) > 1e-3:
        raise MapError(f"{path}: x or y is not evenly spaced")
    transform = (dx, 0.0, float(x[0]) - dx / 2, 0.0, dy, float(y[0]) - dy / 2)
    row0, col0 = _grid_origin(transform, crs, str(path))
    dims = {v: tuple(ds[v].dims) for v in ds.data_vars}
    _check_variables(dims, schema, str(path), lambda v: "")
    scalars, series = _needed(schema, set(dims))
    for v in scalars + series:
        extra = set(dims[v]) - {"time", "step", "y", "x"}
        if extra:
            raise MapError(f"{path}: variable {v!r} has unknown dimensions {sorted(extra)}")
        if v in series:
            if "step" not in dims[v] or ds.sizes["step"] != schema.series_length:
                raise MapError(f"{path}: series {v!r} needs a 'step' dimension of {schema.series_length} "
                               f"(dims {dims[v]}, step size {ds.sizes.get('step')})")
        elif "step" in dims[v]:
            raise MapError(f"{path}: scalar {v!r} has a 'step' dimension")
    if "time" not in ds.dims or ds.sizes["time"] == 0:
        raise MapError(f"{path}: no 'time' dimension: a map needs at least one Sentinel-1 date")
    times = tuple(pd.DatetimeIndex(ds["time"].to_numpy()).normalize())
    sar = [v for v in SAR if v in dims]
    if sar:  # a date where the SAR is nodata everywhere has nothing to map
        valid = ds[sar[0]].notnull().any(dim=("y", "x")).to_numpy()
        if not valid.all():
            raise MapError(f"{path}: date {times[int(np.flatnonzero(~valid)[0])].date()} has no Sentinel-1 "
                           f"{sar[0]!r} data (all nodata)")
    return Stack(str(path), "cube", times, len(y), len(x), row0, col0, {v: "time" in d for v, d in dims.items()})


def _date_key(name: str) -> tuple[str, pd.Timestamp | None]:
    """``vv_2020-06-01`` -> ("vv", the date); a name without a trailing date -> (name, None)."""
    from msda.prepare.rasters import find_date

    found = find_date(name, prefix="_", at_end=True)
    return (name, None) if found is None else (name[: found[0]], found[1])


def _open_folder(path: Path, schema: FeatureSchema) -> Stack:
    import rasterio

    tifs = sorted(p for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not tifs:
        raise MapError(f"{path}: no GeoTIFFs (<variable>.tif, <variable>_<date>.tif) and not a Zarr store")
    files: dict[tuple[str, str], str] = {}
    dated: dict[str, bool] = {}
    dates: set[pd.Timestamp] = set()
    first = None
    bands: dict[str, int] = {}
    for p in tifs:
        var, day = _date_key(p.stem)
        try:
            with rasterio.open(p) as src:
                meta = (src.crs, tuple(src.transform)[:6], src.width, src.height)
                bands[var] = src.count
        except rasterio.errors.RasterioIOError as exc:
            raise MapError(f"{p}: cannot read ({exc})") from None
        origin = _grid_origin(meta[1], meta[0], str(p))
        if first is None:
            first = (p, origin, meta[2], meta[3])
        elif (origin, meta[2], meta[3]) != first[1:]:
            raise MapError(f"{p}: not on the grid of {first[0].name} (origin row/col {origin} vs {first[1]}, "
                           f"{meta[2]} x {meta[3]} vs {first[2]} x {first[3]} pixels); all layers must share one grid")
        if var in dated and dated[var] != (day is not None):
            raise MapError(f"{p}: {var!r} is given both with and without a date")
        dated[var] = day is not None
        if day is not None:
            dates.add(day)
        files[(var, str(day.date()) if day is not None else "")] = str(p)

    def hint(v: str) -> str:
        return f" (expected {v}.tif or {v}_<YYYY-MM-DD>.tif)"

    _check_variables({v: ("time", "y", "x") if d else ("y", "x") for v, d in dated.items()}, schema, str(path), hint)
    if not dates:
        raise MapError(f"{path}: no dated rasters (<variable>_<YYYY-MM-DD>.tif): a map needs Sentinel-1 dates")
    times = tuple(sorted(dates))
    scalars, series = _needed(schema, set(dated))
    for v in scalars + series:
        want = schema.series_length if v in series else 1
        if bands[v] != want:
            raise MapError(f"{path}: {v!r} has {bands[v]} bands, expected {want}"
                           + (" (one per 8-day step)" if v in series else ""))
        if not dated[v]:
            continue
        for day in times:
            if (v, str(day.date())) not in files:
                what = "Sentinel-1 " if v in SAR else ""
                raise MapError(f"{path}: date {day.date()} has no {what}{v!r} raster (expected {v}_{day.date()}.tif)")
    _, (row0, col0), width, height = first
    return Stack(str(path), "folder", times, height, width, row0, col0, dated, files)


# ----- one block ------------------------------------------------------------------------------
_PREDICT_LOCK = threading.Lock()  # one prediction at a time per process: torch uses every core


@functools.lru_cache(maxsize=2)
def _engine(weights: str, device: str, compile: bool = False):
    """The fused ensemble of ``weights``, built once per process (each Dask worker has its own)."""
    from msda.network.engines import inference_engine
    from msda.runtime import resolve_device
    from msda.weights import load_ensemble

    ensemble = load_ensemble(weights)
    engine = inference_engine(ensemble.eval(), resolve_device(device), compile=compile)
    return engine, ensemble.schema, getattr(ensemble, "calibration", None)


def block_features(stack: Stack, schema: FeatureSchema, t: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Raw-unit features (pixels, n_features) of one window and date as float32, NaN where nodata."""
    n = (y1 - y0) * (x1 - x0)
    out = np.empty((n, schema.n_features), np.float32)
    k = GRID_9KM.ratio(GRID_50M)
    rows = np.repeat(np.arange(stack.row0 + y0, stack.row0 + y1) // k, x1 - x0)
    cols = np.tile(np.arange(stack.col0 + x0, stack.col0 + x1) // k, y1 - y0)
    derived = {"doy": np.full(n, float(stack.times[t].day_of_year)), "row_9km": rows.astype(float),
               "col_9km": cols.astype(float)}
    cache: dict[str, np.ndarray] = {}
    for i, (var, enc) in enumerate(_scalar_source(schema, set(stack.dated))):
        if var in derived:
            raw = derived[var]
        else:
            if var not in cache:
                cache[var] = stack.read(var, t, y0, y1, x0, x1).reshape(n)
            raw = cache[var]
        out[:, i] = enc.apply(raw) if enc is not None else raw
    off = schema.n_scalars
    for s in schema.series:
        out[:, off : off + s.length] = stack.read(s.name, t, y0, y1, x0, x1).reshape(s.length, n).T
        off += s.length
    return out


def map_block(
    stack: Stack, weights: str, device: str, store: str, t: int, y0: int, y1: int, x0: int, x1: int,
    ranges: tuple[np.ndarray, np.ndarray] | None = None, compile: bool = False, clip: bool = True,
) -> dict:
    """Predict one window of one date and write it into the Zarr ``store``; returns its statistics."""
    import torch
    import zarr

    from msda.predict import predict

    from msda.calibrate import interval

    start = time.perf_counter()
    engine, schema, calibration = _engine(weights, device, compile)
    t_read = time.perf_counter()
    z = block_features(stack, schema, t, y0, y1, x0, x1)
    z -= schema.lo.astype(np.float32)
    z /= (schema.hi - schema.lo).astype(np.float32)
    # flags from per-pixel extremes (a row's min is NaN if any input is): no feature-sized temporaries
    zmin, zmax = z.min(axis=1), z.max(axis=1)
    nodata = np.isnan(zmin)
    mask = np.where(nodata, NODATA, 0).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        mask[(zmin < -_TOL) | (zmax > 1 + _TOL)] |= OUT_OF_RANGE
        zc = np.clip(z, 0.0, 1.0, out=z)  # in place: the flags above are taken
        if ranges is not None:
            lo, hi = ranges
            outside = np.zeros(len(z), bool)
            for j in range(z.shape[1]):  # one feature at a time: pixel-sized temporaries only
                outside |= (zc[:, j] < lo[j] - _TOL) | (zc[:, j] > hi[j] + _TOL)
            mask[outside] |= OUT_OF_TRAINING
    mean = np.full(len(z), np.nan, np.float32)
    std = np.full(len(z), np.nan, np.float32)
    low = high = None
    ok = ~nodata
    t_wait = time.perf_counter()
    with _PREDICT_LOCK, torch.inference_mode():
        t_pred = time.perf_counter()
        if ok.any():
            pred = predict(engine, zc, rows=None if ok.all() else np.flatnonzero(ok))
            if clip:
                pred, clipped = pred.bounded(schema.truth_max)
                mask[ok] |= clipped
            mean[ok], std[ok] = pred.mean, pred.std
    if calibration is not None:  # the conformal interval of msda calibrate
        low, high = interval(mean, std, calibration, hi=schema.truth_max if clip else None)
    t_write = time.perf_counter()
    del z, zc
    shape = (y1 - y0, x1 - x0)
    group = zarr.open_group(store, mode="r+")
    group["sm_mean"][t, y0:y1, x0:x1] = mean.reshape(shape)
    group["sm_std"][t, y0:y1, x0:x1] = std.reshape(shape)
    group["mask"][t, y0:y1, x0:x1] = mask.reshape(shape)
    if low is not None:
        group["sm_lo"][t, y0:y1, x0:x1] = low.reshape(shape)
        group["sm_hi"][t, y0:y1, x0:x1] = high.reshape(shape)
    release_memory()
    return {
        "t": t, "pixels": len(mean), "predicted": int(ok.sum()), "nodata": int(nodata.sum()),
        "out_of_range": int(((mask & OUT_OF_RANGE) > 0).sum()), "out_of_training": int(((mask & OUT_OF_TRAINING) > 0).sum()),
        "clipped": int(((mask & CLIPPED) > 0).sum()),
        "sum_mean": float(np.nansum(mean)), "sum_std": float(np.nansum(std)),
        "min": float(np.nanmin(mean)) if ok.any() else np.nan, "max": float(np.nanmax(mean)) if ok.any() else np.nan,
        "conv_stage": "C" if engine.native is not None else "PyTorch",
        "seconds": time.perf_counter() - start, "load_s": t_read - start, "read_s": t_wait - t_read,
        "wait_s": t_pred - t_wait, "predict_s": t_write - t_pred, "write_s": time.perf_counter() - t_write,
    }


# ----- the map --------------------------------------------------------------------------------
def training_ranges(table: str | Path, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature [min, max] of a sample table's normalised features (the training domain).

    Date and position features (day of year, 9 km row and column) are left open: a map of
    another date or place is the model's intended use, not an extrapolation of its inputs.
    """
    from msda.tables import read_samples

    x = read_samples(table, schema=schema).features()
    lo, hi = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
    for i, s in enumerate(schema.scalars):
        if s.encoding is not None and s.encoding.source in DERIVED:
            lo[i], hi[i] = 0.0, 1.0
    return lo, hi


def blocks(stack: Stack, chunks: int) -> list[tuple[int, int, int, int, int]]:
    """(t, y0, y1, x0, x1) of every block, date by date."""
    return [
        (t, y0, min(y0 + chunks, stack.height), x0, min(x0 + chunks, stack.width))
        for t in range(len(stack.times))
        for y0 in range(0, stack.height, chunks)
        for x0 in range(0, stack.width, chunks)
    ]


def map_variables(ds) -> list[str]:
    """The output variables of a map store: mean, spread, mask, and the interval when calibrated."""
    return [v for v in ("sm_mean", "sm_std", "mask", "sm_lo", "sm_hi") if v in ds.variables]


def _init_store(stack: Stack, store: Path, chunks: int, attrs: dict, calibration: dict | None = None) -> None:
    import dask.array as dsa
    import rioxarray  # noqa: F401
    import xarray as xr

    x, y = stack.coords()
    shape = (len(stack.times), stack.height, stack.width)
    ch = (1, min(chunks, stack.height), min(chunks, stack.width))
    ds = xr.Dataset(
        {
            "sm_mean": (("time", "y", "x"), dsa.full(shape, np.nan, dtype=np.float32, chunks=ch),
                        {"units": "m3/m3", "long_name": "ensemble mean surface soil moisture (0-5 cm)"}),
            "sm_std": (("time", "y", "x"), dsa.full(shape, np.nan, dtype=np.float32, chunks=ch),
                       {"units": "m3/m3", "long_name": "ensemble member spread (standard deviation)"}),
            "mask": (("time", "y", "x"), dsa.zeros(shape, dtype=np.uint8, chunks=ch),
                     {"flag_masks": [NODATA, OUT_OF_RANGE, OUT_OF_TRAINING, CLIPPED],
                      "flag_meanings": FLAG_MEANINGS}),
        },
        coords={"time": pd.DatetimeIndex(stack.times), "y": y, "x": x},
        attrs={"msda": json.dumps(attrs, default=str)},
    )
    if calibration is not None:
        level = calibration.get("level", 0.9)
        for v, side in (("sm_lo", "lower"), ("sm_hi", "upper")):
            ds[v] = (("time", "y", "x"), dsa.full(shape, np.nan, dtype=np.float32, chunks=ch),
                     {"units": "m3/m3", "long_name": f"{side} bound of the {level:.0%} conformal interval"})
    ds = ds.rio.write_crs(CRS)
    for v in map_variables(ds):
        ds[v].encoding["chunks"] = ch  # beside rioxarray's grid_mapping, which links the CRS
    ds.to_zarr(store, mode="w", compute=False, consolidated=False)


def _run_tasks(tasks: list, scheduler: str | None, workers: int | None, progress: bool) -> list[dict]:
    import dask
    from tqdm.auto import tqdm

    if scheduler:
        from distributed import as_completed

        from msda.runtime import connect_scheduler

        with connect_scheduler(scheduler) as client:
            futures = client.compute(tasks)
            results = []
            with tqdm(total=len(tasks), desc="map", unit=" blocks", disable=not progress,
                      mininterval=bar_interval()) as bar:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            return results
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm.dask import TqdmCallback

    # the cores are shared out: each local worker thread runs PyTorch on its own share of threads
    per_worker = max(1, torch.get_num_threads() // (workers or 1))
    pool = ThreadPoolExecutor(workers or 1, thread_name_prefix="msda-map", initializer=torch.set_num_threads,
                              initargs=(per_worker,))
    try:
        with TqdmCallback(desc="map", unit=" blocks", disable=not progress, mininterval=bar_interval()):
            return list(dask.compute(*tasks, scheduler="threads", pool=pool, num_workers=workers))
    finally:
        pool.shutdown()


def _weights_info(weights: str):
    """The schema and calibration of ``weights``."""
    from msda.weights import load_ensemble

    ensemble = load_ensemble(weights)
    return ensemble.schema, getattr(ensemble, "calibration", None)


def make_map(
    weights: str | Path,
    inputs: str | Path,
    out: str | Path,
    chunks: int = 256,
    scheduler: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    ranges_table: str | Path | None = None,
    previews: bool = True,
    cog: bool = True,
    progress: bool = True,
    scene: dict | None = None,
    compile: bool = False,
    force: bool = False,
    clip: bool = True,
) -> dict:
    """Map every date of ``inputs`` with the ensemble at ``weights`` into ``out`` (atomically).
    ``clip``: the mean clipped to [0, the schema's truth_max] (flag 8 in the mask where it was).

    ``inputs="demo"`` first writes a synthetic scene (``msda.simulate.scene``, settings ``scene``)
    into ``out/scene.zarr`` and compares the map with its true soil moisture. ``compile``:
    torch.compile the PyTorch convolutions in each process instead of running them in C (for GPUs;
    on CPU msda uses the faster of its C stage and PyTorch's, see network.engines.prefer_native).
    """
    import dask

    from msda.provenance import provenance

    if chunks < 16:
        raise MapError(f"--chunks must be at least 16 pixels, got {chunks}")
    sources = (weights, None if str(inputs) == "demo" else inputs, ranges_table)
    check_output(out, "map", sources, force)
    weights, out = str(Path(weights).resolve()), Path(out)
    _engine.cache_clear()  # weights rewritten since this process last loaded them
    # locally the tasks run in this process: the ensemble is loaded once, for them and for this
    schema, calibration = _weights_info(weights) if scheduler else _engine(weights, device, compile)[1:]
    demo = str(inputs) == "demo"
    if not demo:
        stack = open_stack(inputs, schema)
    ranges = training_ranges(ranges_table, schema) if ranges_table else None
    settings = dict(weights=weights, inputs="demo" if demo else str(Path(inputs).resolve()), chunks=chunks,
                    device=device, compile=compile, scheduler=scheduler, ranges_table=str(ranges_table) if ranges_table else None,
                    clip=clip)
    if demo:
        settings["scene"] = dict(scene or {})
    meta = provenance(command="msda map", **settings)
    with atomic_path(out, "map", inputs=sources, force=force) as tmp:
        tmp.mkdir()
        if demo:
            from msda.simulate.scene import simulate_scene, write_scene

            stack = open_stack(write_scene(simulate_scene(**(scene or {})), tmp / "scene.zarr"), schema)
        store = tmp / "maps.zarr"
        _init_store(stack, store, chunks, meta, calibration)
        task = dask.delayed(map_block, pure=False)
        jobs = [task(stack, weights, device, str(store), *b, ranges=ranges, compile=compile, clip=clip)
                for b in blocks(stack, chunks)]
        if workers is None:  # on CPU PyTorch takes every core for each block: one block at a time keeps
            # memory flat, and reading is ~3 % of the time; a GPU predicts while the CPU reads the next
            from msda.runtime import resolve_device

            workers = 2 if resolve_device(device).type == "cuda" else 1
        t0 = time.perf_counter()
        results = _run_tasks(jobs, scheduler, workers, progress)
        seconds = time.perf_counter() - t0
        summary = _summary(stack, results, seconds, meta)
        if demo:
            summary["versus_truth"] = versus_truth(store, tmp / "scene.zarr")
        if cog:
            write_cogs(store, tmp, chunks)
        if previews:
            for t, day in enumerate(stack.times):
                draw_preview(store, t, tmp / f"preview_{day.date()}.png", title=Path(weights).name)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _summary(stack: Stack, results: list[dict], seconds: float, meta: dict) -> dict:
    frame = pd.DataFrame(results)
    dates = []
    for t, day in enumerate(stack.times):
        part = frame[frame["t"] == t]
        pred = int(part["predicted"].sum())
        dates.append({
            "date": str(day.date()), "pixels": int(part["pixels"].sum()), "predicted": pred,
            "nodata": int(part["nodata"].sum()), "out_of_range": int(part["out_of_range"].sum()),
            "out_of_training": int(part["out_of_training"].sum()),
            "clipped": int(part["clipped"].sum()),
            "mean_sm": float(part["sum_mean"].sum() / pred) if pred else None,
            "mean_std": float(part["sum_std"].sum() / pred) if pred else None,
            "min_sm": float(part["min"].min()) if pred else None, "max_sm": float(part["max"].max()) if pred else None,
        })
    pixels = int(frame["pixels"].sum())
    stages = {k[:-2]: round(float(frame[k].sum()), 3) for k in ("load_s", "read_s", "wait_s", "predict_s", "write_s")}
    return {"dates": dates, "pixels": pixels, "blocks": len(frame), "seconds": round(seconds, 3),
            "task_seconds": stages,
            "conv_stage": sorted(set(frame["conv_stage"])),  # C (msda/network/native.py) or PyTorch, per worker
            "pixels_per_s": round(pixels / seconds, 1) if seconds > 0 else None,
            "shape": [len(stack.times), stack.height, stack.width],
            "row0_50m": stack.row0, "col0_50m": stack.col0, "provenance": meta}


def versus_truth(store: Path, scene: Path, var: str = "sm_true") -> list[dict]:
    """Per date: bias, R, RMSE and ubRMSE of the mapped mean against a scene's true soil moisture."""

    from msda.metrics import scores

    maps = open_zarr(store)
    truth = open_zarr(scene)[var]
    out = []
    for t, day in enumerate(pd.DatetimeIndex(maps["time"].to_numpy())):
        pred, obs = maps["sm_mean"].isel(time=t).values.ravel(), truth.isel(time=t).values.ravel()
        ok = np.isfinite(pred) & np.isfinite(obs)
        out.append({"date": str(day.date()), **scores(obs[ok], pred[ok])})
    return out


def write_cogs(store: Path, folder: Path, chunks: int = 256) -> list[Path]:
    """Cloud-Optimized GeoTIFFs of every variable and date of a map store, written window by window."""
    import rasterio

    ds = open_zarr(store)
    x, y = ds["x"].to_numpy(), ds["y"].to_numpy()
    transform = GRID_50M.transform(*GRID_50M.rowcol(x[0], y[0]))
    written = []
    with rasterio.Env(GDAL_CACHEMAX=64):  # MB: GDAL's default (5 % of RAM) would grow with the map
        for t, day in enumerate(pd.DatetimeIndex(ds["time"].to_numpy())):
            for var in map_variables(ds):
                written.append(_write_cog(ds, t, day, var, folder, chunks, transform))
    return written


def _write_cog(ds, t: int, day: pd.Timestamp, var: str, folder: Path, chunks: int, transform) -> Path:
    """One variable and date: a tiled GeoTIFF filled block by block, then GDAL's COG driver."""
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    width, height = ds.sizes["x"], ds.sizes["y"]
    da = ds[var]
    dtype = "uint8" if var == "mask" else "float32"
    plain = folder / f".{var}_{day.date()}.plain.tif"
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype=dtype, crs=CRS, transform=transform,
                   nodata=None if var == "mask" else np.nan, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")
    with rasterio.open(plain, "w", **profile) as dst:
        for y0 in range(0, height, chunks):
            for x0 in range(0, width, chunks):
                y1, x1 = min(y0 + chunks, height), min(x0 + chunks, width)
                block = da.isel(time=t, y=slice(y0, y1), x=slice(x0, x1)).values
                dst.write(block.astype(dtype), 1, window=Window(x0, y0, x1 - x0, y1 - y0))
        dst.set_band_description(1, var)
        dst.update_tags(1, units=da.attrs.get("units", ""), date=str(day.date()))
    target = folder / f"{var}_{day.date()}.tif"
    rasterio.shutil.copy(plain, target, driver="COG", compress="DEFLATE",
                         overview_resampling="nearest" if var == "mask" else "average")
    plain.unlink()
    return target


def draw_preview(store: Path, t: int, path: Path, title: str = "", max_pixels: int = 600) -> Path:
    """A PNG of one date: ensemble mean and member spread with colour bars, masked pixels grey,
    a scale bar; maps over ``max_pixels`` a side (each panel is about 600 pixels wide) are read
    decimated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from msda.figures import plain

    ds = open_zarr(store)
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    step = max(1, int(np.ceil(max(ny, nx) / max_pixels)))
    sub = ds.isel(time=t, y=slice(None, None, step), x=slice(None, None, step))
    mean, std, mask = sub["sm_mean"].values, sub["sm_std"].values, sub["mask"].values
    day = pd.Timestamp(ds["time"].values[t]).date()
    km = ds["x"].size * GRID_50M.cell_m / 1000
    bar_km = next(b for b in (50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1) if b <= km / 4 or b == 0.1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), constrained_layout=True)
    panels = ((mean, "ensemble mean (m3/m3)", "YlGnBu", (0.0, max(0.45, float(np.nanpercentile(mean, 99)) if np.isfinite(mean).any() else 0.45))),
              (std, "member spread, std (m3/m3)", "magma", (0.0, float(np.nanpercentile(std, 99)) if np.isfinite(std).any() else 0.05)))
    for ax, (arr, label, cmap, lim) in zip(axes, panels):
        cm = plt.get_cmap(cmap).with_extremes(bad="0.75")
        shown = np.where(mask & NODATA, np.nan, arr)
        im = ax.imshow(shown, cmap=cm, vmin=lim[0], vmax=max(lim[1], lim[0] + 1e-6), interpolation="nearest")
        flagged = (mask & ~np.uint8(NODATA)) > 0
        if flagged.any():
            ax.contour(flagged.astype(float), levels=[0.5], colors="red", linewidths=0.6)
        fig.colorbar(im, ax=ax, shrink=0.85, label=label)
        ax.add_artist(AnchoredSizeBar(ax.transData, bar_km * 1000 / (GRID_50M.cell_m * step), f"{bar_km:g} km",
                                      "lower left", pad=0.4, frameon=True, size_vertical=max(1, ny // step // 150)))
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title(f"soil moisture {day}")
    axes[1].set_title("uncertainty (grey: nodata; red outline: inputs out of range)")
    fig.suptitle(plain(f"msda map ({title}): {ny} x {nx} pixels of 50 m on the EASE-2 grid"))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
