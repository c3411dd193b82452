"""msda calibrate: a conformal scale of the member spread, stored with the weights, and the
interval predict then writes."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from msda.calibrate import calibrate_weights, conformal_scale, coverage, interval
from msda.cli import app
from msda.errors import MsdaError
from msda.tables import samples_from_frame, write_samples
from msda.weights import load_ensemble, save_ensemble


def test_conformal_scale_covers_fresh_data_at_its_level():
    rng = np.random.default_rng(0)

    def draw(n):
        spread = rng.uniform(0.005, 0.05, n)
        mean = rng.uniform(0.05, 0.4, n)
        truth = mean + rng.normal(0, 2.5 * spread)  # the spread is 2.5 x too narrow
        return truth, mean, spread

    q = conformal_scale(*draw(2000), level=0.9)
    truth, mean, spread = draw(20000)
    assert coverage(truth, *interval(mean, spread, {"scale": q})) == pytest.approx(0.9, abs=0.015)
    assert coverage(truth, mean - 1.645 * spread, mean + 1.645 * spread) < 0.6  # the raw spread undercovers
    with pytest.raises(MsdaError, match="too few"):
        conformal_scale(*draw(5), level=0.9)


def test_calibrate_weights_then_predict_writes_the_interval(tmp_path, fine, small_ensemble):
    from msda.predict import predict_table

    save_ensemble(small_ensemble, tmp_path / "w")
    write_samples(fine, tmp_path / "held_out.parquet")
    rec = calibrate_weights(tmp_path / "w", tmp_path / "held_out.parquet", level=0.8)
    assert rec["level"] == 0.8 and rec["scale"] > 0 and rec["coverage_on_calibration"] >= 0.8
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["calibration"]["scale"] == rec["scale"]
    w = load_ensemble(tmp_path / "w")
    assert w.calibration["scale"] == rec["scale"]
    predict_table(w, tmp_path / "held_out.parquet", tmp_path / "p.parquet", progress=False, clip=False)
    out = pd.read_parquet(tmp_path / "p.parquet")
    assert ((out["sm_lo"] <= out["sm_pred"]) & (out["sm_pred"] <= out["sm_hi"])).all()
    inside = (fine.frame["sm_m3m3"].to_numpy() >= out["sm_lo"]) & (fine.frame["sm_m3m3"].to_numpy() <= out["sm_hi"])
    assert inside.mean() >= 0.8  # on the calibration samples themselves, by construction
    r = CliRunner().invoke(app, ["weights", "info", str(tmp_path / "w")])
    assert "calibration: 80% interval" in r.output


def test_calibration_refuses_training_stations(tmp_path, fine, small_ensemble):
    trained = sorted(fine.frame["station"].astype(str).unique())[:1]
    small_ensemble.provenance = {"train_stations": trained}
    from msda.provenance import provenance

    save_ensemble(small_ensemble, tmp_path / "w", provenance(train_stations=trained))
    write_samples(fine, tmp_path / "f.parquet")
    with pytest.raises(MsdaError, match="trained these weights"):
        calibrate_weights(tmp_path / "w", tmp_path / "f.parquet")
    before = (tmp_path / "w" / "manifest.json").read_text()
    assert "calibration" not in before
    rest = fine.frame[~fine.frame["station"].astype(str).isin(trained)].reset_index(drop=True)
    write_samples(samples_from_frame(rest, "fine"), tmp_path / "rest.parquet")
    assert calibrate_weights(tmp_path / "w", tmp_path / "rest.parquet", level=0.5)["stations"] >= 1
