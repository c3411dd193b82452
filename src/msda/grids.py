"""EASE-Grid 2.0 global grids (EPSG:6933) at 9 km and its nested 50 m cells (METHOD.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyproj import Transformer

EASE2_UL_X = -17367530.45  # m, upper-left corner of the global grids
EASE2_UL_Y = 7314540.83


@dataclass(frozen=True)
class Ease2Grid:
    """One EASE-2 global grid: cell size in metres, columns, rows."""

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


GRID_9KM = Ease2Grid("EASE2_M09km", 9008.05, 3856, 1624)
GRID_50M = Ease2Grid("EASE2_M50m", 9008.05 / 180, 3856 * 180, 1624 * 180)

_TO_EASE = Transformer.from_crs("EPSG:4326", "EPSG:6933", always_xy=True)
_TO_LONLAT = Transformer.from_crs("EPSG:6933", "EPSG:4326", always_xy=True)


def lonlat_to_xy(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _TO_EASE.transform(np.asarray(lon, dtype=float), np.asarray(lat, dtype=float))


def xy_to_lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _TO_LONLAT.transform(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
