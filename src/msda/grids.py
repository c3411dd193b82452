"""EASE-Grid 2.0 global grids (EPSG:6933): 36 km, 9 km, 3 km, 1 km and the nested 50 m grid.

The cell sizes are the exact NSIDC values (36 km / 4 = 9 km, 9 km / 3 = 3 km, 3 km / 3 = 1 km);
METHOD.md section 2 rounds them to 9008.05 m and 1000.90 m. The 50 m grid is the 1 km grid split
20 x 20 (so a 9 km cell holds 180 x 180 cells of 50 m). All grids share the map extent
x in [-17367530.45, 17367530.45] m, y in [-7314540.83, 7314540.83] m; rows count down from the
top, columns to the east, both from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyproj import Transformer

from msda.errors import MsdaError

EASE2_UL_X = -17367530.44516  # m, upper-left corner of the global grids
EASE2_UL_Y = 7314540.830638
CELL_36KM = 36032.220840584
CRS = "EPSG:6933"
MAX_LAT = 85.0445664  # latitude of the grids' top and bottom edges


class GridError(MsdaError):
    """A coordinate outside the grid, or a grid that does not nest."""


@dataclass(frozen=True)
class Ease2Grid:
    """One EASE-2 global grid: name, cell size in metres, columns, rows."""

    name: str
    cell_m: float
    n_cols: int
    n_rows: int

    def rowcol(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of projected coordinates (m, EPSG:6933)."""
        col = np.floor((np.asarray(x) - EASE2_UL_X) / self.cell_m).astype(np.int64)
        row = np.floor((EASE2_UL_Y - np.asarray(y)) / self.cell_m).astype(np.int64)
        return row, col

    def center(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected coordinates (m) of cell centres."""
        x = EASE2_UL_X + (np.asarray(col) + 0.5) * self.cell_m
        y = EASE2_UL_Y - (np.asarray(row) + 0.5) * self.cell_m
        return x, y

    def bounds(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cell bounds (left, bottom, right, top) in metres."""
        left = EASE2_UL_X + np.asarray(col) * self.cell_m
        top = EASE2_UL_Y - np.asarray(row) * self.cell_m
        return left, top - self.cell_m, left + self.cell_m, top

    def transform(self, row0: int, col0: int):
        """The affine transform (north up) of a raster whose first cell is (row0, col0)."""
        from affine import Affine

        return Affine(self.cell_m, 0.0, EASE2_UL_X + col0 * self.cell_m, 0.0, -self.cell_m, EASE2_UL_Y - row0 * self.cell_m)

    def lonlat_to_rowcol(self, lon, lat, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of longitudes and latitudes (degrees); outside the grid is an error."""
        lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
        if check:
            bad = ~np.isfinite(lon) | ~np.isfinite(lat) | (np.abs(lat) > MAX_LAT) | (np.abs(lon) > 180.0)
            if bad.any():
                i = int(np.flatnonzero(bad.ravel())[0])
                raise GridError(
                    f"lon {lon.ravel()[i]}, lat {lat.ravel()[i]} lies outside the EASE-2 global grid {self.name} "
                    f"(latitudes within +-{MAX_LAT} degrees, longitudes within +-180)"
                )
        return self.rowcol(*lonlat_to_xy(lon, lat))

    def rowcol_to_lonlat(self, row, col) -> tuple[np.ndarray, np.ndarray]:
        """Longitude and latitude of cell centres."""
        return xy_to_lonlat(*self.center(row, col))

    def ratio(self, finer: "Ease2Grid") -> int:
        """How many cells of ``finer`` span one cell of this grid along a side."""
        k = self.cell_m / finer.cell_m
        if abs(k - round(k)) > 1e-6 or round(k) < 1:
            raise GridError(f"{finer.name} does not nest in {self.name} ({k:.6f} cells per side)")
        return int(round(k))

    def children(self, row: int, col: int, finer: "Ease2Grid") -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns (flattened, row-major) of the cells of ``finer`` inside one cell."""
        k = self.ratio(finer)
        rr, cc = np.meshgrid(np.arange(k) + row * k, np.arange(k) + col * k, indexing="ij")
        return rr.ravel(), cc.ravel()

    def parent(self, row, col, finer: "Ease2Grid") -> tuple[np.ndarray, np.ndarray]:
        """Row and column in this grid of cells of ``finer``."""
        k = self.ratio(finer)
        return np.asarray(row) // k, np.asarray(col) // k


GRID_36KM = Ease2Grid("EASE2_M36km", CELL_36KM, 964, 406)
GRID_9KM = Ease2Grid("EASE2_M09km", CELL_36KM / 4, 3856, 1624)
GRID_3KM = Ease2Grid("EASE2_M03km", CELL_36KM / 12, 11568, 4872)
GRID_1KM = Ease2Grid("EASE2_M01km", CELL_36KM / 36, 34704, 14616)
GRID_50M = Ease2Grid("EASE2_M50m", CELL_36KM / 720, 34704 * 20, 14616 * 20)
GRIDS = {"36km": GRID_36KM, "9km": GRID_9KM, "3km": GRID_3KM, "1km": GRID_1KM, "50m": GRID_50M}

_TO_EASE = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
_TO_LONLAT = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)


def lonlat_to_xy(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _TO_EASE.transform(np.asarray(lon, dtype=float), np.asarray(lat, dtype=float))


def xy_to_lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _TO_LONLAT.transform(np.asarray(x, dtype=float), np.asarray(y, dtype=float))


def degrees(value: float, axis: str, digits: int = 1) -> str:
    """A longitude or latitude as people read it: 98.5\u00b0W, 12\u00b0E, 36.6\u00b0N."""
    hemisphere = ("E", "W") if axis == "lon" else ("N", "S")
    sign = "" if value == 0 else hemisphere[int(value < 0)]
    return f"{abs(value):.{digits}f}\u00b0{sign}"
