import math

import numpy as np
import pandas as pd
import pytest
import torch

from msda.errors import SchemaError
from msda.network.model import DenseSM
from msda.schema import DEFAULT_SCHEMA, FeatureSchema, load_schema, table1

from conftest import random_raw_inputs


def test_table1_layout_matches_method():
    s = table1()
    assert s.n_features == 153
    assert s.feature_names[:15] == [
        "vv", "vh", "angle", "doy_sin", "doy_cos", "sand", "clay", "bulk_density",
        "elevation", "slope", "aspect_sin", "aspect_cos", "row", "col_sin", "col_cos",
    ]
    assert s.feature_names[15] == "ndvi_00" and s.feature_names[60] == "ndvi_45"
    assert s.feature_names[61] == "t2m_00" and s.feature_names[152] == "tp_45"
    assert s.authors_columns[0] == "0" and s.authors_columns[-1] == "152"
    assert (s.lo[0], s.hi[0]) == (-30.0, 5.0)
    assert (s.lo[7], s.hi[7]) == (100.0, 180.0)
    assert (s.lo[-1], s.hi[-1]) == (0.0, 0.3)
    assert s.is_default


def test_normalise_round_trip_and_clip():
    raw = random_raw_inputs(500, DEFAULT_SCHEMA, seed=4)
    feats = DEFAULT_SCHEMA.encode(raw)
    z = DEFAULT_SCHEMA.normalise(feats)
    assert z.dtype == np.float32 and z.min() >= 0 and z.max() <= 1
    back = DEFAULT_SCHEMA.denormalise(z)
    np.testing.assert_allclose(DEFAULT_SCHEMA.denormalise_column("elevation", z[:, 8]), back["elevation"])
    with pytest.raises(SchemaError, match="no feature 'vv_db'"):
        DEFAULT_SCHEMA.denormalise_column("vv_db", z[:, 0])
    span = DEFAULT_SCHEMA.hi - DEFAULT_SCHEMA.lo
    assert np.all(np.abs(back.to_numpy() - feats.to_numpy()) <= 1e-6 * span + 1e-7)
    # out-of-range values clip to the bounds
    feats.loc[0, "vv"] = 20.0
    feats.loc[1, "vv"] = -80.0
    z = DEFAULT_SCHEMA.normalise(feats)
    assert z[0, 0] == 1.0 and z[1, 0] == 0.0


def test_encodings_and_decode():
    raw = pd.DataFrame({"doy": [0.0, 91.25, 200.0], "aspect_deg": [0.0, 90.0, 270.0], "col_9km": [0, 964, 3000],
                        "row_9km": [0, 812, 1623]})
    fill = {s.name: s.lo for s in DEFAULT_SCHEMA.scalars if s.encoding is None}
    fill.update({c: se.lo for se in DEFAULT_SCHEMA.series for c in se.column_names()})
    raw = pd.concat([raw, pd.DataFrame(fill, index=raw.index)], axis=1)
    f = DEFAULT_SCHEMA.encode(raw)
    assert f["doy_sin"][1] == pytest.approx(1.0)
    assert f["aspect_cos"][2] == pytest.approx(0.0, abs=1e-12)
    assert f["aspect_sin"][2] == pytest.approx(-1.0)
    assert f["row"][1] == pytest.approx(0.5)
    assert f["col_sin"][1] == pytest.approx(math.sin(2 * math.pi * 964 / 3856))
    dec = DEFAULT_SCHEMA.decode(f)
    np.testing.assert_allclose(dec["doy"], raw["doy"], atol=1e-9)
    np.testing.assert_allclose(dec["aspect_deg"], raw["aspect_deg"], atol=1e-9)
    np.testing.assert_allclose(dec["row_9km"], raw["row_9km"], atol=1e-9)
    with pytest.raises(SchemaError, match="doy_sin.*doy"):
        DEFAULT_SCHEMA.encode(raw.drop(columns=["doy"]))


def test_dict_round_trip_and_files(tmp_path):
    s = table1()
    assert FeatureSchema.from_dict(s.to_dict()) == s
    s.save(tmp_path / "s.yaml")
    s.save(tmp_path / "s.json")
    s.save(tmp_path / "s.toml")
    assert load_schema(tmp_path / "s.yaml") == s
    assert load_schema(tmp_path / "s.json").same_layout(s)
    assert load_schema(tmp_path / "s.toml") == s  # the format its extension names, read back
    assert (tmp_path / "s.toml").read_text().startswith('name = "table1"')
    with pytest.raises(SchemaError, match="ends in .toml, .yaml, .yml or .json"):
        s.save(tmp_path / "s.txt")


CUSTOM_TOML = """
name = "no-vh-30"
description = "VV only, 30-step series, one extra scalar"
[[scalars]]
name = "vv"
units = "dB"
lo = -30
hi = 5
[[scalars]]
name = "doy_sin"
lo = -1
hi = 1
encoding = { source = "doy", func = "sin", period = 365 }
[[scalars]]
name = "soil_temp"
units = "degC"
lo = -10
hi = 40
[[series]]
name = "ndvi"
lo = -0.2
hi = 1
length = 30
[[series]]
name = "tp"
units = "m/d"
lo = 0
hi = 0.3
length = 30
"""


def test_custom_schema_sizes_densesm(tmp_path):
    p = tmp_path / "custom.toml"
    p.write_text(CUSTOM_TOML)
    s = load_schema(p)
    assert s.n_features == 3 + 2 * 30
    assert not s.is_default
    m = DenseSM(2, 16, s).eval()
    # 3 scalars + 2 means + 4 filters x pooled(30)=ceil(7/4)=2 -> 13 inputs to the dense part
    assert m.n_in == 3 + 2 + 8
    y, f = m(torch.rand(5, s.n_features), return_features=True)
    assert y.shape == (5,) and f.shape == (5, 32)


@pytest.mark.parametrize(
    "text, match",
    [
        ("name='x'\n[[scalars]]\nname='a'\nlo=1\nhi=0\n[[series]]\nname='s'\nlo=0\nhi=1", "lo < hi"),
        ("name='x'\n[[scalars]]\nname='a'\nlo=0\nhi=1\nfoo=2\n[[series]]\nname='s'\nlo=0\nhi=1", "unknown keys"),
        ("name='x'\n[[series]]\nname='s'\nlo=0\nhi=1\nlength=10\n[[series]]\nname='t'\nlo=0\nhi=1\nlength=12", "one length"),
        ("name='x'\n[[scalars]]\nname='a'\nhi=1", "required key 'lo'"),
        ("name='x'\n", "no inputs"),
        ("name='x'\n[[scalars]]\nname='a'\nlo=0\nhi=1\n[[scalars]]\nname='a'\nlo=0\nhi=1\n[[series]]\nname='s'\nlo=0\nhi=1", "duplicated"),
        ("name='x'\n[[scalars]]\nname='a'\nlo=0\nhi=1\nencoding={source='d', func='tan', period=3}\n[[series]]\nname='s'\nlo=0\nhi=1", "sin, cos or ratio"),
        ("name = [", "not a valid schema file"),
    ],
)
def test_bad_schema_files(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SchemaError, match=match):
        load_schema(p)


def test_missing_schema_file(tmp_path):
    with pytest.raises(SchemaError, match="nope.yaml"):
        load_schema(tmp_path / "nope.yaml")
