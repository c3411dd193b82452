"""msda experiment: protocol, pairing, statistics, resumption, Dask, report, bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from scipy import stats

from msda.errors import MsdaError
from msda.experiment import ExperimentError, Inputs, Protocol, median_runs, run_experiment
from msda.metrics import grouped_scores, scores
from msda.network.model import DenseSME, MemberSpec
from msda.simulate import SimConfig, simulate
from msda.tables import write_samples
from msda.weights import save_ensemble

SPECS = [MemberSpec(1, 8), MemberSpec(2, 8)]
PROTO = dict(ns=(1, 2), repeats=3, methods=("pretrained", "finetune", "msda"), alphas=(0.5, 0.9), epochs=1,
             average_last=1, batch=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    bench = simulate(SimConfig(scale=0.05, seed=3, networks=("SCAN", "USCRN"), pretrain_cells=40))
    d = tmp_path_factory.mktemp("exp")
    write_samples(bench.fine, d / "fine.parquet")
    write_samples(bench.coarse, d / "coarse.parquet")
    save_ensemble(DenseSME(SPECS, seed=0), d / "w")
    return d


@pytest.fixture(scope="module")
def done(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    inputs = Inputs(str(files / "fine.parquet"), str(files / "coarse.parquet"), str(files / "w"))
    tables = run_experiment(inputs, out, Protocol.make(**PROTO), scheduler="inline", device="cpu", progress=False)
    return out, inputs, tables


def test_grouped_scores_equal_scores():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, 400)
    codes[:3] = 5  # a group of 3
    codes[3] = 6  # a group of one: no R
    truth = rng.uniform(0.05, 0.45, 400)
    pred = truth + rng.normal(0.01, 0.04, 400)
    pred[10] = np.nan
    got = grouped_scores(codes, truth, pred, 8)
    for g in range(7):
        want = scores(truth[codes == g], pred[codes == g])
        for m in ("n", "bias", "r", "rmse", "ubrmse"):
            assert got.loc[g, m] == pytest.approx(want[m], rel=1e-9, abs=1e-12, nan_ok=True), (g, m)
    assert got.loc[7, "n"] == 0 and np.isnan(got.loc[7, "rmse"])


def test_protocol_tasks_and_seeds():
    p = Protocol.make(**PROTO)
    tasks = p.tasks()
    # pretrained once; per (N, repeat): finetune + msda at two alphas
    assert len(tasks) == 1 + 2 * 3 * 3 and len({t.key for t in tasks}) == len(tasks)
    assert p.station_seed(1, 0) != p.station_seed(1, 1) != p.station_seed(2, 1)
    assert Protocol.make(**PROTO, seed=1).station_seed(1, 0) != p.station_seed(1, 0)
    q = Protocol.quick_run()
    assert q.quick and len(q.members) == 5 and q.repeats < 10
    for kwargs, match in [({"methods": ("nope",)}, "unknown method"), ({"alphas": (1.5,)}, "alpha"),
                          ({"repeats": 0}, "repeats"), ({"ns": (0,)}, "N must be")]:
        with pytest.raises(ExperimentError, match=match):
            Protocol.make(**{**PROTO, **kwargs}).check(10)
    with pytest.raises(ExperimentError, match="no target station"):
        Protocol.make(**PROTO).check(2)


def test_protocol_composes_the_fit_settings():
    p = Protocol.make(**{**PROTO, "lr": 1e-3, "domain_loss": "mmd"})
    assert p.train.lr == 1e-3 and p.train.epochs == PROTO["epochs"] and p.loss.domain_loss == "mmd"
    assert Protocol.from_dict(p.to_dict()) == p
    # the flat layout of older run records reads to the same protocol
    flat = {k: v for k, v in p.to_dict().items() if k not in ("train", "loss")}
    assert Protocol.from_dict({**flat, **p.to_dict()["train"], "domain_loss": "mmd"}) == p
    task = next(t for t in p.tasks() if t.method == "msda")
    weights, settings = p.task_settings(task, seed=5, device="cpu")
    assert (weights.alpha, weights.beta, weights.domain_loss) == (task.alpha, "auto", "mmd")
    assert (settings.seed, settings.device, settings.lr) == (5, "cpu", 1e-3)
    with pytest.raises(ExperimentError, match="unknown protocol setting"):
        Protocol.make(epoch=3)


def test_runs_are_paired_and_scored_on_the_other_stations(done, files):
    out, _, t = done
    runs = t["runs"]
    # pretrained is scored on every draw; 2 Ns x 3 repeats x (pretrained, finetune, msda 0.5, msda 0.9)
    assert len(runs) == 2 * 3 * 4
    assert runs.groupby(["n", "repeat"])["train_stations"].nunique().eq(1).all()  # same stations per draw
    assert runs.groupby("n")["train_stations"].nunique().eq(3).all()  # new stations per repeat
    fine = pd.read_parquet(files / "fine.parquet")
    for _, row in runs.sample(5, random_state=0).iterrows():
        train = json.loads(row["train_stations"])
        assert len(train) == row["n"]
        target = fine[(fine["network"] == "SCAN") & ~fine["station"].isin(train)]
        assert row["samples"] == len(target)
        assert row["inductive_samples"] == (fine["network"] != "SCAN").sum()
    st = t["stations"]
    assert not st.merge(runs[["variant", "n", "repeat", "train_stations"]]).apply(
        lambda r: r["station"] in json.loads(r["train_stations"]), axis=1).any()
    assert set(t["regions"]["strip"]) == set(range(6))
    # the spread as an error bar, per run: rank correlation and the coverage of a conformal interval
    assert runs["spread_error_spearman"].between(-1, 1).all() and runs["coverage_90"].between(0, 1).all()
    assert (runs["interval_scale"] > 0).all()


def test_uncertainty_scores_on_known_data():
    from msda.experiment import uncertainty

    rng = np.random.default_rng(0)
    spread = rng.uniform(0.01, 0.05, 4000)
    pred = rng.uniform(0.1, 0.3, 4000)
    truth = pred + rng.normal(0, 1.0, 4000) * spread * 2  # errors grow with the spread
    half = np.arange(4000) < 2000
    u = uncertainty(truth, pred, spread, calibrate_on=half, score_on=~half)
    assert u["coverage_90"] == pytest.approx(0.9, abs=0.03) and u["spread_error_spearman"] > 0.2


def test_median_run_and_t_tests(done):
    _, _, t = done
    runs, med, tt = t["runs"], t["median"], t["ttests"]
    for _, row in med.iterrows():
        g = runs[(runs["variant"] == row["variant"]) & (runs["n"] == row["n"])]
        assert row["rmse"] == pytest.approx(np.sort(g["rmse"])[1])  # 2nd of 3
        assert g.loc[g["repeat"] == row["median_repeat"], "rmse"].iloc[0] == row["rmse"]
    row = tt[(tt["n"] == 2) & (tt["a"] == "finetune") & (tt["b"] == "msda (0.5)")].iloc[0]
    a = runs[(runs["n"] == 2) & (runs["variant"] == "finetune")].sort_values("repeat")["rmse"]
    b = runs[(runs["n"] == 2) & (runs["variant"] == "msda (0.5)")].sort_values("repeat")["rmse"]
    assert row["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert list(t["alpha"]["alpha"]) == [0.5, 0.9] and list(t["alpha"].columns[-2:]) == ["N=1", "N=2"]
    # an even count takes the lower median (the paper's 5th of 10)
    four = pd.DataFrame({"variant": "x", "method": "x", "alpha": np.nan, "n": 1, "repeat": range(4),
                         "rmse": [0.4, 0.1, 0.3, 0.2], "bias": 0.0, "r": 0.5, "ubrmse": 0.1, "inductive_rmse": 0.1,
                         "station_rmse": 0.1})
    assert median_runs(four)["rmse"].iloc[0] == 0.2


def test_report_and_results(done):
    out, _, _ = done
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    for name in ("runs", "stations", "networks", "regions", "median", "ttests", "alpha"):
        assert (out / "results" / f"{name}.parquet").exists()
    record = json.loads((out / "protocol.json").read_text())
    assert record["protocol"]["train"]["epochs"] == 1 and "torch" in record
    assert "Take-home." in html and "Lowest median-run RMSE" in html
    assert "<b>Transductive</b>" in html and "<b>ubRMSE</b>" in html
    assert '"fingerprints"' not in html and "&quot;protocol&quot;" not in html  # no raw JSON dump
    regions = pd.read_parquet(out / "results" / "regions.parquet")
    lon = regions[regions["kind"] == "longitude"]["range"]
    assert lon.str.fullmatch(r"\d+\.\d\u00b0W to \d+\.\d\u00b0W").all(), lon.unique()


def test_take_home_names_the_best_and_its_significance():
    from msda.report import take_home

    median = pd.DataFrame({"variant": ["msda (0.7)", "finetune", "msda (0.7)", "finetune"], "n": [1, 1, 5, 5],
                           "rmse": [0.08, 0.10, 0.07, 0.069]})
    tt = pd.DataFrame({"n": [1, 5], "a": ["finetune", "finetune"], "b": ["msda (0.7)", "msda (0.7)"],
                       "p": [0.001, 0.4]})
    text = take_home(median, tt)
    assert text.startswith("Lowest median-run RMSE on the target stations: msda (0.7) at N = 1; finetune at N = 5.")
    assert "significant at N = 1 (over finetune, p = 0.001)" in text
    assert "not at N = 5 (over msda (0.7), p = 0.4)" in text
    none = take_home(median, tt.assign(p=[0.3, 0.4]))
    assert "significant at no N: 1 (over finetune, p = 0.3); 5 (over msda (0.7), p = 0.4)." in none
    assert "significant at every N" in take_home(median, tt.assign(p=[0.01, 0.02]))


def test_resume_redoes_only_missing_fits(done):
    out, inputs, tables = done
    files = sorted((out / "tasks").glob("*.parquet"))
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    files[3].unlink()
    again = run_experiment(inputs, out, Protocol.make(**PROTO), scheduler="inline", device="cpu", progress=False, report=False)
    after = {f.name: f.stat().st_mtime_ns for f in (out / "tasks").glob("*.parquet")}
    assert set(after) == set(stamps)
    assert [k for k in after if after[k] != stamps[k]] == [files[3].name]
    timing = ["seconds", "fit_seconds"]
    pd.testing.assert_frame_equal(again["runs"].drop(columns=timing), tables["runs"].drop(columns=timing))  # same seeds, same fit
    with pytest.raises(ExperimentError, match="other fit settings"):
        run_experiment(inputs, out, Protocol.make(**{**PROTO, "epochs": 2}), scheduler="inline", progress=False)


def test_tasks_run_on_a_local_dask_cluster(files, tmp_path):
    inputs = Inputs(str(files / "fine.parquet"), str(files / "coarse.parquet"), str(files / "w"))
    p = Protocol.make(ns=(1,), repeats=2, methods=("finetune",), epochs=1, average_last=1, batch=64)
    t = run_experiment(inputs, tmp_path / "d", p, device="cpu", progress=False, report=False)
    assert len(t["runs"]) == 2 and len(list((tmp_path / "d" / "tasks").glob("*.parquet"))) == 2
    meta = json.loads(__import__("pyarrow.parquet").parquet.read_schema(
        next((tmp_path / "d" / "tasks").glob("*.parquet"))).metadata[b"msda"])
    assert meta["method"] == "finetune" and len(meta["beta"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ns", "1,20"], "leaves no target station"),
        (["--methods", "finetune,magic"], "unknown method 'magic'"),
        (["--network", "NOPE"], "no samples of network 'NOPE'"),
        (["--ns", "1,x"], "--ns"),
    ],
)
def test_bad_input_one_error(files, tmp_path, capsys, extra, message):
    args = ["experiment", "--fine", str(files / "fine.parquet"), "--coarse", str(files / "coarse.parquet"),
            "-w", str(files / "w"), "-o", str(tmp_path / "o"), "--scheduler", "inline", "--epochs", "1"]
    code, err = run_cli(args + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "o" / "tasks").exists()
    code, err = run_cli(["experiment", "--fine", str(tmp_path / "missing.parquet"), "--coarse", "x", "-w", "y",
                         "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "missing.parquet" in err


def test_report_command_rewrites_the_report(done, capsys):
    out, _, _ = done
    (out / "report.html").unlink()
    code, err = run_cli(["report", str(out)], capsys)
    assert code in (0, None), err
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 6
    code, err = run_cli(["report", str(out / "tasks")], capsys)
    assert code == 2 and "not a run directory" in err


def test_existing_cluster_by_address(files, tmp_path):
    from dask.distributed import LocalCluster

    inputs = Inputs(str(files / "fine.parquet"), str(files / "coarse.parquet"), str(files / "w"))
    p = Protocol.make(ns=(2,), repeats=1, methods=("msda",), epochs=1, average_last=1, batch=64)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        t = run_experiment(inputs, tmp_path / "a", p, scheduler=cluster.scheduler_address, device="cpu",
                           progress=False, report=False)
    assert len(t["runs"]) == 1 and t["runs"]["n"].iloc[0] == 2
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            pytest.raises(MsdaError, match="cannot reach a Dask scheduler"):
        run_experiment(inputs, tmp_path / "b", p, scheduler="tcp://127.0.0.1:9", progress=False, report=False)
