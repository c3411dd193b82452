import numpy as np
import pandas as pd
import pytest

from msda.errors import TableError
from msda.schema import DEFAULT_SCHEMA, load_schema
from msda.tables import (
    date_to_edate,
    edate_to_date,
    read_samples,
    samples_from_frame,
    to_authors,
    write_samples,
)

from conftest import make_frame


def test_edate_conversion():
    # spreadsheet serial days: 1899-12-30 = 0, 2016-01-01 = 42370 (the authors' year bounds)
    assert date_to_edate(["1899-12-30", "2016-01-01", "2021-12-31"]).tolist() == [0, 42370, 44561]
    assert list(edate_to_date([42370, 42370.75, 44561])) == [
        pd.Timestamp("2016-01-01"), pd.Timestamp("2016-01-01"), pd.Timestamp("2021-12-31")
    ]


@pytest.mark.parametrize("kind", ["fine", "coarse"])
def test_csv_parquet_round_trip(tmp_path, kind):
    s = samples_from_frame(make_frame(kind), kind)
    write_samples(s, tmp_path / "t.csv")
    write_samples(s, tmp_path / "t.parquet")
    from_csv = read_samples(tmp_path / "t.csv")
    from_pq = read_samples(tmp_path / "t.parquet")
    assert from_csv.kind == kind and from_pq.kind == kind
    pd.testing.assert_frame_equal(from_pq.frame, s.frame)
    pd.testing.assert_frame_equal(from_csv.frame, s.frame, check_exact=False, rtol=1e-7, check_dtype=False)
    # CSV -> Parquet -> CSV gives the same text
    write_samples(from_csv, tmp_path / "t2.parquet")
    write_samples(read_samples(tmp_path / "t2.parquet"), tmp_path / "t2.csv")
    assert (tmp_path / "t.csv").read_text() == (tmp_path / "t2.csv").read_text()


def test_authors_layout_exactly(tmp_path, fine, coarse):
    write_samples(fine, tmp_path / "input_fine.csv")
    write_samples(coarse, tmp_path / "input_9km.csv")
    f = pd.read_csv(tmp_path / "input_fine.csv", index_col="s_index")
    c = pd.read_csv(tmp_path / "input_9km.csv")
    assert list(f.columns[:153]) == [str(i) for i in range(153)]
    assert {"gt", "network", "station", "r", "c", "edate", "lc"} <= set(f.columns)
    assert "SMAP" in c.columns and "gt" not in c.columns and "s_index" not in c.columns
    assert f["edate"].iloc[0] == date_to_edate([fine.frame["date"].iloc[0]])[0]
    np.testing.assert_allclose(f["5"].to_numpy(), fine.frame["sand"].to_numpy(), rtol=1e-7)
    # the authors' own reading code: pd.read_csv(..., index_col='s_index') and columns '0':'152'
    x = np.asarray(f.loc[:, "0":"152"]).astype(np.float32)
    np.testing.assert_allclose(x, fine.features(), rtol=1e-6)


def test_csv_with_unnamed_index_reads(tmp_path, coarse):
    df = to_authors(coarse)
    df.to_csv(tmp_path / "a.csv")  # pandas writes an unnamed index column
    s = read_samples(tmp_path / "a.csv", kind="coarse")
    assert len(s) == len(coarse)


def _write_authors(tmp_path, df, name="bad.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


@pytest.fixture
def authors_fine(fine):
    return to_authors(fine).reset_index()


def test_missing_feature_column(tmp_path, authors_fine):
    p = _write_authors(tmp_path, authors_fine.drop(columns=["17"]))
    with pytest.raises(TableError, match=r"bad.csv: missing feature columns \['17'\]"):
        read_samples(p)


def test_extra_feature_column(tmp_path, authors_fine):
    df = authors_fine.copy()
    df["153"] = 0.5
    p = _write_authors(tmp_path, df)
    with pytest.raises(TableError, match=r"bad.csv: extra feature columns \['153'\]"):
        read_samples(p)


def test_extra_feature_column_parquet(tmp_path, fine):
    df = fine.frame.copy()
    df["ndvi_46"] = 0.1
    df.to_parquet(tmp_path / "x.parquet")
    with pytest.raises(TableError, match=r"x.parquet: extra feature columns \['ndvi_46'\]"):
        read_samples(tmp_path / "x.parquet", kind="fine")


def test_non_numeric(tmp_path, authors_fine):
    df = authors_fine.copy()
    df["3"] = df["3"].astype(object)
    df.loc[4, "3"] = "wet"
    p = _write_authors(tmp_path, df)
    with pytest.raises(TableError, match=r"column 'doy_sin' holds non-numeric values \(e.g. 'wet'\) at rows 4"):
        read_samples(p)


def test_nan_error_and_drop(tmp_path, authors_fine):
    df = authors_fine.copy()
    df.loc[[2, 9], "100"] = np.nan
    p = _write_authors(tmp_path, df)
    with pytest.raises(TableError, match=r"2 rows have NaN features \(first in column 't2m_39'\) at rows 2, 9; pass --drop-nan"):
        read_samples(p)
    s = read_samples(p, drop_nan=True)
    assert s.dropped_nan == 2 and len(s) == len(df) - 2


@pytest.mark.parametrize("value", [1.2, -0.01, np.nan])
def test_truth_range(tmp_path, authors_fine, value):
    df = authors_fine.copy()
    df.loc[3, "gt"] = value
    p = _write_authors(tmp_path, df)
    with pytest.raises(TableError, match=r"truth column 'sm_m3m3' must be soil moisture in \[0, 1\].*rows 3"):
        read_samples(p)


def test_duplicates(tmp_path, authors_fine):
    df = pd.concat([authors_fine, authors_fine.iloc[[5]]], ignore_index=True)
    p = _write_authors(tmp_path, df)
    with pytest.raises(TableError, match=r"2 rows duplicate a \(network, station, date\) key.*'station': 'st0'.*rows 5, 24"):
        read_samples(p)


def test_duplicates_coarse_by_cell(tmp_path, coarse):
    df = to_authors(coarse)
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    p = _write_authors(tmp_path, df, "c.csv")
    with pytest.raises(TableError, match=r"duplicate a \(r, c, date\) key"):
        read_samples(p)


def test_network_filter(tmp_path, fine):
    write_samples(fine, tmp_path / "f.parquet")
    s = read_samples(tmp_path / "f.parquet", networks=["SCAN"])
    assert set(s.frame["network"]) == {"SCAN"} and len(s) == 12
    with pytest.raises(TableError, match=r"unknown network\(s\) \['SCNA'\]; the table holds \['ARM', 'SCAN', 'USCRN'\]"):
        read_samples(tmp_path / "f.parquet", networks=["SCNA"])


def test_wrong_kind_and_missing_truth(tmp_path, coarse):
    write_samples(coarse, tmp_path / "c.csv")
    with pytest.raises(TableError, match=r"missing truth column 'gt' of a fine table \(it has 'SMAP'"):
        read_samples(tmp_path / "c.csv", kind="fine")
    write_samples(coarse, tmp_path / "c.parquet")
    with pytest.raises(TableError, match="records a coarse table, fine was asked for"):
        read_samples(tmp_path / "c.parquet", kind="fine")


def test_parquet_schema_mismatch(tmp_path, fine):
    write_samples(fine, tmp_path / "f.parquet")
    p = tmp_path / "s.yaml"
    d = DEFAULT_SCHEMA.to_dict()
    d["name"] = "wider-vv"
    d["scalars"][0]["lo"] = -40.0
    import yaml

    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TableError, match="written with schema 'table1'.*differs from schema 'wider-vv'"):
        read_samples(tmp_path / "f.parquet", schema=load_schema(p))


def test_unreadable_and_unknown_format(tmp_path):
    with pytest.raises(TableError, match="no such file"):
        read_samples(tmp_path / "none.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(TableError, match="unknown table format '.xlsx'"):
        read_samples(tmp_path / "t.xlsx")
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(TableError, match="not a readable Parquet table"):
        read_samples(tmp_path / "t.parquet")


def test_failed_write_leaves_nothing(tmp_path, fine, monkeypatch):
    import msda.tables as tables

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        write_samples(fine, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []
