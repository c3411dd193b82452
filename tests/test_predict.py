import numpy as np
import pandas as pd
import pytest
import torch

from msda.errors import MsdaError, TableError
from msda.network.model import DenseSME, MemberSpec
from msda.predict import FusedEnsemble, predict, predict_table
from msda.schema import DEFAULT_SCHEMA, FeatureSchema
from msda.tables import write_samples

from conftest import randomise_batchnorm


def test_fused_equals_module(full_ensemble):
    x = torch.rand(300, 153)
    with torch.no_grad():
        ref = full_ensemble.member_outputs(x)
    torch.testing.assert_close(FusedEnsemble(full_ensemble).member_outputs(x), ref, rtol=1e-5, atol=1e-5)
    for conv_batch in (1, 7, 128, 1000):  # the PyTorch convolution stage
        got = FusedEnsemble(full_ensemble, conv_batch=conv_batch, native=False).member_outputs(x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [8, 30, 31, 70])
def test_fused_custom_schema(length):
    d = DEFAULT_SCHEMA.to_dict()
    for s in d["series"]:
        s["length"] = length
    d["scalars"] = d["scalars"][:4]
    schema = FeatureSchema.from_dict(d)
    e = DenseSME([MemberSpec(1, 8), MemberSpec(4, 32)], schema=schema, seed=3)
    randomise_batchnorm(e)
    e.eval()
    x = torch.rand(50, schema.n_features)
    with torch.no_grad():
        ref = e.member_outputs(x)
    for native in (None, False):
        torch.testing.assert_close(FusedEnsemble(e, native=native).member_outputs(x), ref, rtol=1e-5, atol=1e-5)


def test_predict_rows_gathers_without_copy(small_ensemble):
    x = np.random.default_rng(1).random((500, 153), dtype=np.float32)
    rows = np.flatnonzero(np.random.default_rng(2).random(500) < 0.3)
    got = predict(small_ensemble, x, batch_size=64, rows=rows)
    ref = predict(small_ensemble, x[rows], batch_size=64)
    np.testing.assert_allclose(got.members, ref.members, rtol=1e-6, atol=1e-6)
    assert len(got.mean) == len(rows)


def test_predict_outputs(small_ensemble):
    x = np.random.default_rng(0).random((1000, 153), dtype=np.float32)
    p = predict(small_ensemble, x, batch_size=333)
    with torch.no_grad():
        ref = small_ensemble.member_outputs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(p.members, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.mean, ref.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.std, ref.std(1), rtol=1e-4, atol=1e-5)
    assert p.member_names == ["m_1_8", "m_2_16", "m_3_8"]
    assert list(p.frame().columns) == ["sm_pred", "sm_std", "m_1_8", "m_2_16", "m_3_8"]
    assert predict(small_ensemble, x[:0]).members.shape == (0, 3)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_chunked_table_equals_unchunked(tmp_path, small_ensemble, suffix):
    from conftest import make_frame
    from msda.tables import samples_from_frame

    s = samples_from_frame(make_frame("fine", n_stations=40, n_dates=25, seed=3), "fine")
    write_samples(s, tmp_path / f"in{suffix}")
    whole = predict(small_ensemble, s.features())
    n = predict_table(small_ensemble, tmp_path / f"in{suffix}", tmp_path / f"out{suffix}", chunk_rows=77,
                      batch_size=50, progress=False)
    assert n == 1000
    out = pd.read_parquet(tmp_path / f"out{suffix}") if suffix == ".parquet" else pd.read_csv(tmp_path / f"out{suffix}")
    assert list(out["station"][:2]) == ["st0", "st0"]
    tol = 1e-6 if suffix == ".parquet" else 1e-5
    # the mean clipped to the physical range (the members as the networks gave them)
    np.testing.assert_allclose(out["sm_pred"].to_numpy(), np.clip(whole.mean, 0, 0.6), rtol=tol, atol=tol)
    np.testing.assert_allclose(out[["m_1_8", "m_2_16", "m_3_8"]].to_numpy(), whole.members, rtol=tol, atol=tol)
    # without members; whole table in one chunk gives the same numbers
    predict_table(small_ensemble, tmp_path / f"in{suffix}", tmp_path / "one.parquet", with_members=False, progress=False)
    one = pd.read_parquet(tmp_path / "one.parquet")
    assert "m_1_8" not in one.columns
    np.testing.assert_allclose(one["sm_std"].to_numpy(), whole.std, rtol=1e-5, atol=1e-6)


def test_predict_table_errors(tmp_path, small_ensemble, fine):
    write_samples(fine, tmp_path / "in.parquet")
    with pytest.raises(MsdaError, match="must end in .parquet or .csv"):
        predict_table(small_ensemble, tmp_path / "in.parquet", tmp_path / "out.txt", progress=False)
    df = fine.frame.drop(columns=["vv"])
    df.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(TableError, match=r"bad.parquet: missing feature columns \['vv'\]"):
        predict_table(small_ensemble, tmp_path / "bad.parquet", tmp_path / "out.parquet", progress=False)
    assert not (tmp_path / "out.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".in.parquet.msda-output", "bad.parquet", "in.parquet"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_absent_error(small_ensemble):
    with pytest.raises(MsdaError, match="CUDA is not available"):
        predict(small_ensemble, np.zeros((2, 153), np.float32), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(small_ensemble):
    x = np.random.default_rng(1).random((500, 153), dtype=np.float32)
    a = predict(small_ensemble, x, device="cpu")
    b = predict(small_ensemble, x, device="cuda")
    np.testing.assert_allclose(a.members, b.members, rtol=1e-4, atol=1e-4)


def test_compiled_conv_stage_matches(small_ensemble):
    """torch.compile path (fixed sub-batch shape, tail padded) gives the eager numbers."""
    x = torch.rand(150, 153)  # 64 + 64 + a padded tail of 22
    got = FusedEnsemble(small_ensemble, compile=True).member_outputs(x)
    with torch.no_grad():
        torch.testing.assert_close(got, small_ensemble.member_outputs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [None, False])
def test_member_features_equal_modules(full_ensemble, native):
    """The bottleneck features (after its batch norm) and outputs of every member, as the modules give them."""
    x = torch.rand(50, 153, generator=torch.Generator().manual_seed(2))
    y, f = FusedEnsemble(full_ensemble, native=native).member_features(x)
    with torch.no_grad():
        ref = [m.eval()(x, return_features=True) for m in full_ensemble.members]
    torch.testing.assert_close(y, torch.stack([r[0] for r in ref]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f, torch.stack([r[1] for r in ref]), rtol=1e-4, atol=1e-4)


def test_predictions_bounded_and_flagged(tmp_path, fine, small_ensemble):
    """sm_pred is clipped to [0, truth_max] with flag 8 where it was; --no-clip keeps the raw
    mean; flag 4 marks rows outside the training table's ranges."""
    from msda.predict import CLIPPED, OUT_OF_TRAINING, predict_table
    from msda.tables import samples_from_frame

    write_samples(fine, tmp_path / "f.parquet")
    raw = predict(small_ensemble, fine.features()).mean
    predict_table(small_ensemble, tmp_path / "f.parquet", tmp_path / "raw.parquet", progress=False, clip=False)
    kept = pd.read_parquet(tmp_path / "raw.parquet")
    np.testing.assert_allclose(kept["sm_pred"], raw, rtol=1e-6)
    assert (kept["flag"] & CLIPPED == 0).all()
    predict_table(small_ensemble, tmp_path / "f.parquet", tmp_path / "p.parquet", progress=False)
    out = pd.read_parquet(tmp_path / "p.parquet")
    np.testing.assert_allclose(out["sm_pred"], np.clip(raw, 0, 0.6), rtol=1e-6)
    outside = (raw < 0) | (raw > 0.6)
    assert outside.any()  # an untrained ensemble predicts outside the physical range
    np.testing.assert_array_equal((out["flag"] & CLIPPED) > 0, outside)
    # rows outside the training table's ranges
    half = samples_from_frame(fine.frame.iloc[: len(fine) // 2].reset_index(drop=True), "fine")
    write_samples(half, tmp_path / "train.parquet")
    from msda.mapping import training_ranges

    ranges = training_ranges(tmp_path / "train.parquet", fine.schema)
    predict_table(small_ensemble, tmp_path / "f.parquet", tmp_path / "q.parquet", progress=False, ranges=ranges)
    flags = pd.read_parquet(tmp_path / "q.parquet")["flag"].to_numpy()
    assert not (flags[: len(fine) // 2] & OUT_OF_TRAINING).any() and (flags & OUT_OF_TRAINING).any()
