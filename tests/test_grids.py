"""EASE-Grid 2.0 against published grid facts (NSIDC), round trips and nesting."""

import numpy as np
import pytest

from msda.grids import (
    EASE2_UL_X,
    EASE2_UL_Y,
    GRID_1KM,
    GRID_3KM,
    GRID_9KM,
    GRID_36KM,
    GRID_50M,
    GridError,
    xy_to_lonlat,
)


def test_published_dimensions_and_extent():
    assert (GRID_36KM.n_cols, GRID_36KM.n_rows) == (964, 406)
    assert (GRID_9KM.n_cols, GRID_9KM.n_rows) == (3856, 1624)
    assert (GRID_3KM.n_cols, GRID_3KM.n_rows) == (11568, 4872)
    assert (GRID_1KM.n_cols, GRID_1KM.n_rows) == (34704, 14616)
    assert GRID_9KM.cell_m == pytest.approx(9008.055210146)
    assert GRID_1KM.cell_m == pytest.approx(1000.895023349)
    for g in (GRID_36KM, GRID_9KM, GRID_3KM, GRID_1KM, GRID_50M):
        # every grid spans the same symmetric map extent
        assert g.n_cols * g.cell_m == pytest.approx(-2 * EASE2_UL_X, abs=1e-3)
        assert g.n_rows * g.cell_m == pytest.approx(2 * EASE2_UL_Y, abs=1e-3)
    lon, lat = xy_to_lonlat(EASE2_UL_X, EASE2_UL_Y)
    assert lat == pytest.approx(85.0445664, abs=1e-6) and lon == pytest.approx(-180.0, abs=1e-9)


def test_known_cells():
    # upper-left 9 km cell centre (NSIDC: 84.65642 N, 179.95332 W); the lower-right mirrors it
    lon, lat = GRID_9KM.rowcol_to_lonlat(0, 0)
    assert (lon, lat) == pytest.approx((-179.953320, 84.656419), abs=1e-5)
    lon, lat = GRID_9KM.rowcol_to_lonlat(1623, 3855)
    assert (lon, lat) == pytest.approx((179.953320, -84.656419), abs=1e-5)
    # the equator and the prime meridian are cell edges: (0, 0) is the corner of 4 cells
    assert GRID_9KM.lonlat_to_rowcol(1e-6, 1e-6) == (811, 1928)
    assert GRID_9KM.lonlat_to_rowcol(-1e-6, -1e-6) == (812, 1927)
    left, bottom, right, top = GRID_9KM.bounds(811, 1928)
    assert (left, bottom) == pytest.approx((0.0, 0.0), abs=1e-3)
    assert (right - left, top - bottom) == pytest.approx((GRID_9KM.cell_m, GRID_9KM.cell_m))


def test_round_trip_and_nesting():
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(-125, -67, 500), rng.uniform(25, 50, 500)
    r9, c9 = GRID_9KM.lonlat_to_rowcol(lon, lat)
    r50, c50 = GRID_50M.lonlat_to_rowcol(lon, lat)
    assert GRID_9KM.ratio(GRID_50M) == 180 and GRID_9KM.ratio(GRID_1KM) == 9 and GRID_1KM.ratio(GRID_50M) == 20
    pr, pc = GRID_9KM.parent(r50, c50, GRID_50M)
    assert np.array_equal(pr, r9) and np.array_equal(pc, c9)
    cr, cc = GRID_50M.lonlat_to_rowcol(*GRID_50M.rowcol_to_lonlat(r50, c50))
    assert np.array_equal(cr, r50) and np.array_equal(cc, c50)
    rows, cols = GRID_9KM.children(int(r9[0]), int(c9[0]), GRID_50M)
    assert len(rows) == 180 * 180 and ((rows == r50[0]) & (cols == c50[0])).sum() == 1
    with pytest.raises(GridError, match="does not nest"):
        GRID_1KM.ratio(GRID_9KM)


def test_outside_the_grid_is_an_error():
    with pytest.raises(GridError, match="lat 89.0"):
        GRID_9KM.lonlat_to_rowcol([10.0, 20.0], [45.0, 89.0])
    with pytest.raises(GridError):
        GRID_9KM.lonlat_to_rowcol(200.0, 10.0)


def test_transform_puts_cells_at_their_bounds():
    from msda.grids import GRID_9KM

    t = GRID_9KM.transform(100, 2000)
    left, bottom, right, top = GRID_9KM.bounds(103, 2005)
    assert t * (5, 3) == pytest.approx((left, top))
    assert t * (6, 4) == pytest.approx((right, bottom))
