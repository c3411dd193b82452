"""msda pretrain / msda adapt end to end on a small generated benchmark, and their bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import run_cli

from msda.adapt import adapt
from msda.cli import app
from msda.network.model import DenseSME, MemberSpec
from msda.simulate import SimConfig, simulate
from msda.tables import write_samples
from msda.transfer import TrainSettings
from msda.weights import load_ensemble, save_ensemble

runner = CliRunner()


SPECS = [MemberSpec(1, 8), MemberSpec(2, 16)]


@pytest.fixture(scope="module")
def bench():
    return simulate(SimConfig(scale=0.05, seed=3, networks=("SCAN", "USCRN"), pretrain_cells=40))


@pytest.fixture(scope="module")
def files(tmp_path_factory, bench):
    d = tmp_path_factory.mktemp("adapt")
    write_samples(bench.fine, d / "fine.parquet")
    write_samples(bench.coarse, d / "coarse.parquet")
    write_samples(bench.pretrain, d / "pretrain.parquet")
    save_ensemble(DenseSME(SPECS, seed=0), d / "w0")
    return d


def test_pretrain_then_adapt_cli(files, tmp_path):
    r = runner.invoke(app, ["pretrain", "-s", str(files / "pretrain.parquet"), "-o", str(tmp_path / "pre"),
                            "--epochs", "2", "--widths", "8", "--depths", "1,2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    pre = load_ensemble(tmp_path / "pre")
    assert pre.names == ["m_1_8", "m_2_8"] and pre.provenance["task"] == "pretrain"
    out = tmp_path / "run"
    r = runner.invoke(app, ["adapt", "-w", str(tmp_path / "pre"), "--fine", str(files / "fine.parquet"),
                            "--coarse", str(files / "coarse.parquet"), "--network", "SCAN", "--stations", "2",
                            "--method", "msda", "--epochs", "3", "--average-last", "2", "-o", str(out), "--device", "cpu",
                            "--monitor-every", "1"])
    assert r.exit_code == 0, r.output
    assert "target stations" in r.output and "pretrained" in r.output
    assert {p.name for p in out.iterdir()} == {"weights", "stations.csv", "losses.csv", "metrics.csv", "run.json",
                                               "target_predictions.parquet", "losses.png", "target_scatter.png",
                                               ".msda-output"}
    losses = pd.read_csv(out / "losses.csv")
    assert len(losses) == 2 * 3 and {"joint", "fine_50m", "coarse_9km", "domain"} <= set(losses.columns)
    assert losses[["joint", "fine_50m", "coarse_9km", "domain", "monitor_rmse"]].notna().all().all()
    assert list(losses["member"][:2]) == ["m_1_8", "m_2_8"]  # rows in the ensemble's member order
    stations = pd.read_csv(out / "stations.csv")
    assert len(stations) == 2 and (stations["samples"] > 5).all()
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "msda" and run["alpha"] == 0.7 and run["beta"] == "auto" and len(run["beta_per_member"]) == 2
    assert sorted(run["train_stations"]) == sorted(stations["station"])
    target = pd.read_parquet(out / "target_predictions.parquet")
    assert not set(target["station"]) & set(stations["station"])  # transductive: target = other stations
    assert load_ensemble(out / "weights").provenance["method"] == "msda"
    # inductive use: the adapted weights predict any other table
    r = runner.invoke(app, ["predict", "-w", str(out / "weights"), "-s", str(files / "fine.parquet"), "-o", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0, r.output


def test_station_list(files, tmp_path, bench):
    names = sorted(bench.fine.frame.query("network == 'SCAN'")["station"].unique())[:2]
    (tmp_path / "st.txt").write_text("\n".join(names) + "\n")
    r = runner.invoke(app, ["adapt", "-w", str(files / "w0"), "--fine", str(files / "fine.parquet"),
                            "--coarse", str(files / "coarse.parquet"), "--network", "SCAN", "--station-list",
                            str(tmp_path / "st.txt"), "--method", "finetune", "--epochs", "1", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert sorted(pd.read_csv(tmp_path / "o" / "stations.csv")["station"]) == names


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "msda", "--alpha", "1.5", "--stations", "2"], "alpha must be in [0, 1]"),
        (["--method", "msda", "--beta", "-2", "--stations", "2"], "beta must be"),
        (["--method", "magic", "--stations", "2"], "unknown method"),
        (["--method", "msda", "--stations", "999"], "at most"),
        (["--method", "msda", "--stations", "2", "--network", "NOPE"], "no samples of network 'NOPE'"),
        (["--method", "msda"], "exactly one of --stations"),
    ],
)
def test_bad_input_one_error_no_output(files, tmp_path, capsys, extra, message):
    args = ["adapt", "-w", str(files / "w0"), "--fine", str(files / "fine.parquet"), "--coarse",
            str(files / "coarse.parquet"), "--epochs", "1", "-o", str(tmp_path / "o")]
    if "--network" not in extra:
        args += ["--network", "SCAN"]
    code, err = run_cli(args + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_schema_mismatch_is_an_error(files, tmp_path, bench):
    from msda.schema import FeatureSchema, table1

    d = table1().to_dict()
    d["name"] = "short"
    d["series"] = [dict(s, length=23) for s in d["series"]]
    other = FeatureSchema.from_dict(d)
    e = DenseSME(SPECS, schema=other, seed=0)
    with pytest.raises(Exception, match="schema"):
        adapt(e, bench.fine, bench.coarse, "SCAN", 2, "msda", tmp_path / "o", TrainSettings(epochs=1, device="cpu"))
    assert not (tmp_path / "o").exists()


def test_adaptation_beats_pretrained_under_domain_shift(bench, tmp_path):
    """Pretrain on the 9 km table, adapt to SCAN's 50 m stations: the target error falls."""
    from msda.adapt import pretrain

    pre = pretrain(bench.pretrain, tmp_path / "pre", TrainSettings(epochs=4, batch=64, average_last=2, device="cpu"),
                   members=SPECS, progress=False)
    _, metrics = adapt(pre.ensemble, bench.fine, bench.coarse, "SCAN", 4, "msda", tmp_path / "o",
                       TrainSettings(epochs=8, batch=64, average_last=3, device="cpu"), progress=False, figures=False)
    rmse = dict(zip(metrics["model"], metrics["rmse"]))
    assert np.isfinite(rmse["pretrained"]) and rmse["msda"] < rmse["pretrained"], rmse


def test_fifty_metre_only_path(files, tmp_path, capsys):
    """Stations but no 9 km data: pretrain on the 50 m table, then finetune or DA without --coarse;
    MS and MSDA ask for it before any work."""
    r = runner.invoke(app, ["pretrain", "-s", str(files / "fine.parquet"), "-o", str(tmp_path / "pre50"),
                            "--epochs", "1", "--widths", "8", "--depths", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for method in ("finetune", "da"):
        r = runner.invoke(app, ["adapt", "-w", str(tmp_path / "pre50"), "--fine", str(files / "fine.parquet"),
                                "--network", "SCAN", "--stations", "2", "--method", method, "--epochs", "1",
                                "-o", str(tmp_path / method), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        run = json.loads((tmp_path / method / "run.json").read_text())
        assert run["coarse"] is None and run["counts"]["coarse_9km"] == 0
    code, err = run_cli(["adapt", "-w", str(tmp_path / "pre50"), "--fine", str(files / "fine.parquet"), "--network",
                         "SCAN", "--stations", "2", "--method", "msda", "-o", str(tmp_path / "m")], capsys)
    assert code == 2 and "give --coarse" in err and not (tmp_path / "m").exists()


def test_validate_uses_the_recorded_schema_and_flags_raw_units(files, tmp_path, bench):
    from msda.schema import load_schema
    from msda.tables import samples_from_frame

    r = runner.invoke(app, ["validate", str(files / "fine.parquet")])
    assert r.exit_code == 0 and "looks unnormalised" not in r.output, r.output
    raw = bench.fine.frame.copy()
    raw["ndvi_00"] = np.linspace(-0.2, 0.9, len(raw))  # raw NDVI: inside the accepted margin, below 0
    write_samples(samples_from_frame(raw, "fine"), tmp_path / "raw.parquet")
    r = runner.invoke(app, ["validate", str(tmp_path / "raw.parquet")])
    assert r.exit_code == 0 and "looks unnormalised: 1 feature columns outside [0, 1]: ndvi_00 (-0.2 to 0.9)" in r.output
    # a table of another schema validates against the schema it records
    (tmp_path / "s.toml").write_text("name = 'two'\n[[scalars]]\nname = 'vv'\nlo = 0\nhi = 1\n"
                                     "[[series]]\nname = 'ndvi'\nlo = 0\nhi = 1\nlength = 8\n")
    schema = load_schema(tmp_path / "s.toml")
    frame = bench.fine.frame[["network", "station", "r", "c", "date", "lc", "sm_m3m3", "vv"]].copy()
    for i in range(8):
        frame[f"ndvi_{i:02d}"] = 0.5
    write_samples(samples_from_frame(frame, "fine", schema), tmp_path / "two.parquet")
    r = runner.invoke(app, ["validate", str(tmp_path / "two.parquet")])
    assert r.exit_code == 0 and "schema two (9 features)" in r.output, r.output
