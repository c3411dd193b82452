"""The paper's evaluation (METHOD.md section 6), one Dask task per fit, resumable.

A run directory holds:

- ``protocol.json``: the protocol, the inputs with content fingerprints, and the versions (a
  resumed run, and ``msda report``, must match it: same settings, same file contents)
- ``tasks/<key>.parquet``: one finished fit each (written atomically): the ensemble-mean
  prediction for every row of the fine table, with the training stations, seeds, beta per
  member and timings in the Parquet metadata. ``pretrained`` is one task; its predictions are
  scored against the training stations of every (N, repeat).
- ``results/*.parquet``: the tables of :func:`analyse` (runs, stations, networks, regions,
  median runs, t-tests, alpha table)
- ``figures/*.png`` and ``report.html`` (see :mod:`msda.report`)

A killed run continues where it stopped: finished task files are not redone, and a task file
that cannot be read (0 bytes, cut short) is done again. One process at a time works in a run
directory (``.msda-lock``); a second one leaves with a message naming the first.
"""

from __future__ import annotations

import dataclasses
import logging
import json
from dataclasses import dataclass
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msda.io import atomic_path, check_output, output_folder
from msda.metrics import METRICS, grouped_scores
from msda.runtime import bar_interval
from msda.tables import TRUTH, Samples
from msda.runs import (  # noqa: F401 (the run records, importable from here as before)
    ALPHA_METHODS,
    METHODS,
    N_STRIPS,
    PAPER_NS,
    QUICK_MEMBERS,
    SAMPLES,
    ExperimentError,
    Inputs,
    Protocol,
    Task,
    input_fingerprints,
    load_inputs,
    read_record,
    read_spread,
    read_task,
    select_members,
    task_done,
)

# ----- running one task (on a Dask worker or inline) ----------------------------------------
def run_task(task: Task, protocol: Protocol, inputs: Inputs, out: str, device: str = "auto", threads: int = 0) -> str:
    """Fit one task and write ``out/tasks/<key>.parquet``; returns the key. Skips a finished one."""
    import torch

    from msda.predict import predict
    from msda.runtime import tune_allocator
    from msda.runtime import resolve_device
    from msda.transfer import adapt_problem, fit

    path = Path(out) / "tasks" / f"{task.key}.parquet"
    if task_done(path):
        return task.key
    if threads:
        torch.set_num_threads(threads)
    fine, coarse, ensemble = load_inputs(inputs, protocol.members)
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_allocator()
    t0 = time.perf_counter()
    meta = {"key": task.key, "n": task.n, "repeat": task.repeat, "method": task.method, "alpha": task.alpha}
    if task.method == "pretrained":
        model, extra = ensemble, {"train_stations": [], "beta": [], "fit_seconds": 0.0, "station_seed": None}
    else:
        seed = protocol.station_seed(task.n, task.repeat)
        problem = adapt_problem(fine, coarse, protocol.network, task.n, seed=seed)
        weights, settings = protocol.task_settings(task, seed, str(dev))
        result = fit(ensemble, problem.fit_data(), weights, settings, progress=False, description=task.key)
        model = result.ensemble
        extra = {"train_stations": problem.train_stations, "beta": result.beta, "fit_seconds": round(result.seconds, 3),
                 "station_seed": seed, "steps": result.steps, "parts": result.parts}
    pred = predict(model, fine.features(), device=dev)
    meta.update(extra, seconds=round(time.perf_counter() - t0, 3), device=str(dev), threads=torch.get_num_threads())
    table = pa.table({"pred": pred.mean.astype(np.float32), "spread": pred.std.astype(np.float32)})
    table = table.replace_schema_metadata({b"msda": json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return task.key


# ----- what a run depends on -----------------------------------------------------------------
@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.msda-lock`` while working in a run directory; a second process leaves at once."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this system
        yield
        return
    path = out / ".msda-lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ExperimentError(
                f"{out}: another msda process works in this run directory ({holder}); wait for it to end "
                "or use another --out"
            ) from None
        except OSError:  # a file system without advisory locks (some network mounts): work unlocked
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()


# ----- the whole run -----------------------------------------------------------------------
def _check_inputs_exist(inputs: "Inputs", whose: str = "") -> None:
    for name, path in zip(("fine table", "9 km table", "weights"), dataclasses.astuple(inputs)):
        if not Path(path).exists():
            raise ExperimentError(f"{path}: the {name}{whose} does not exist")


def check_inputs_unchanged(out: Path, record: dict, inputs: "Inputs", now: dict | None = None) -> None:
    """Refuse to mix fits of other inputs: every input's content must match the run's record
    (``now``: the inputs' fingerprints, when already computed)."""
    recorded = record.get("fingerprints")
    if not isinstance(recorded, dict):
        raise ExperimentError(
            f"{out / 'protocol.json'}: made by an msda without input fingerprints, so a resume cannot be checked; "
            "use a new --out"
        )
    now = input_fingerprints(inputs) if now is None else now
    changed = [k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]
    if changed:
        names = ", ".join(f"{k} ({getattr(inputs, k, None)})" for k in changed)
        raise ExperimentError(
            f"{out}: the contents of the inputs changed since this run started: {names}; its finished fits "
            "belong to the old ones. Use a new --out, or put the old inputs back"
        )


def _check_resume(out: Path, old: dict, record: dict, inputs: "Inputs") -> None:
    """A run directory resumes only with the same fit settings and inputs of the same content
    (wherever they now lie)."""
    check_inputs_unchanged(out, old, inputs, record["fingerprints"])
    before, now = old.get("fit") or {}, json.loads(json.dumps(record["fit"], default=str))  # tuples as lists
    changed = [f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        raise ExperimentError(
            f"{out / 'protocol.json'}: this run directory was made with other fit settings ({'; '.join(changed)}); "
            "use a new --out or the same settings"
        )


def run_experiment(
    inputs: Inputs,
    out: str | Path,
    protocol: Protocol,
    scheduler: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
    report: bool = True,
) -> dict[str, pd.DataFrame]:
    """Run (or resume) every task of ``protocol``, then the analysis, figures and report.

    ``scheduler``: None starts a local Dask cluster; an address ('tcp://host:8786') uses an
    existing one (its workers must see the input paths and ``out``); 'inline' runs the tasks in
    this process without Dask.
    """
    from tqdm.auto import tqdm

    from msda.provenance import provenance

    out = Path(out)
    inputs = Inputs(*(str(Path(v).resolve()) if v else None for v in dataclasses.astuple(inputs)))
    check_output(out, "experiment", dataclasses.astuple(inputs))
    _check_inputs_exist(inputs)
    fine, coarse, ensemble = load_inputs(inputs, protocol.members)
    if protocol.network not in fine.networks:
        raise ExperimentError(f"{inputs.fine}: no samples of network {protocol.network!r} (networks: {', '.join(fine.networks)})")
    n_stations = fine.frame.loc[fine.frame["network"].astype(str) == protocol.network, "station"].nunique()
    protocol.check(n_stations)
    with output_folder(out, "experiment", dataclasses.astuple(inputs)), run_lock(out):
        record = {
            "protocol": protocol.to_dict(),
            "fit": protocol.fit_fields(),
            "inputs": dataclasses.asdict(inputs),
            "fingerprints": input_fingerprints(inputs),
            "members": ensemble.names,
            "n_tasks": len(protocol.tasks()),
            **provenance(),
        }
        if (out / "protocol.json").exists():
            _check_resume(out, read_record(out), record, inputs)
        (out / "tasks").mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "protocol.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str))

        tasks = protocol.tasks()
        todo = [t for t in tasks if not task_done(out / "tasks" / f"{t.key}.parquet")]
        if todo:
            _run_tasks(todo, protocol, inputs, out, scheduler, workers, device, progress, tqdm)
        tables = analyse(out, fine, coarse, protocol, tasks)
        if report:
            from msda.report import write_report

            write_report(out, tables, record)
    return tables


def rescore(run_dir: str | Path) -> tuple[dict[str, pd.DataFrame], Path]:
    """``msda report``: score a run's finished fits again and rewrite its tables, figures and
    report, after checking that its inputs are the ones the fits were made from."""
    from msda.report import write_report

    out = Path(run_dir)
    record = read_record(out)
    try:
        p = record["protocol"]
        protocol = Protocol.from_dict(p)
        inputs = Inputs(**record["inputs"])
    except (KeyError, TypeError) as exc:
        raise ExperimentError(f"{out / 'protocol.json'}: malformed run record ({exc})") from None
    _check_inputs_exist(inputs, " of this run")
    with run_lock(out):
        check_inputs_unchanged(out, record, inputs)
        fine, coarse, _ = load_inputs(inputs, protocol.members)
        tables = analyse(out, fine, coarse, protocol, protocol.tasks())
        return tables, write_report(out, tables, record)


def _run_tasks(todo, protocol, inputs, out, scheduler, workers, device, progress, tqdm) -> None:
    bar = tqdm(total=len(todo), desc="experiment", unit=" fits", disable=not progress, mininterval=bar_interval())
    # repeat by repeat, so that a run stopped early has every N for its first repeats; within a
    # repeat the costly fits first, so that the cluster does not end waiting on one large N
    todo = sorted(todo, key=lambda t: (t.repeat, -t.n))
    try:
        if scheduler == "inline":
            for t in todo:
                run_task(t, protocol, inputs, str(out), device)
                bar.update()
            return
        from dask.distributed import Client, LocalCluster, as_completed

        cluster = None
        if scheduler is None:
            import torch

            cores = torch.get_num_threads()  # as configure_threads set it (--threads, or the available cores)
            n = workers or 1
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client, threads = Client(cluster), max(1, cores // n)
            from msda.runtime import quiet_local_workers

            quiet_local_workers(client)
        else:
            from msda.runtime import connect_scheduler

            client, threads = connect_scheduler(scheduler), 0
        try:
            futures = {client.submit(run_task, t, protocol, inputs, str(out.resolve()), device, threads,
                                     key=f"msda-{t.key}", pure=False): t for t in todo}
            for fut in as_completed(futures):
                if fut.status == "error":
                    exc = fut.exception()
                    raise ExperimentError(f"task {futures[fut].key} failed: {exc}") from None
                bar.update()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    finally:
        bar.close()


# ----- analysis ------------------------------------------------------------------------------
def station_table(fine: Samples) -> pd.DataFrame:
    """One row per station: network, lon, lat (from ``stations.csv`` beside the fine table, else
    the centre of its 9 km cell), and its longitudinal and latitudinal strip (6 each, about equal
    station counts)."""
    from msda.grids import GRID_9KM, xy_to_lonlat

    frame = fine.frame
    st = frame.groupby("station", sort=True).agg(network=("network", "first"), r=("r", "first"), c=("c", "first"))
    st.index = st.index.astype(str)
    side = Path(fine.source).with_name("stations.csv")
    lon = lat = None
    if side.exists():
        known = pd.read_csv(side, dtype={"station": str}).set_index("station")
        if {"lon", "lat"} <= set(known.columns) and st.index.isin(known.index).all():
            lon, lat = known.loc[st.index, "lon"].to_numpy(), known.loc[st.index, "lat"].to_numpy()
    if lon is None:
        lon, lat = xy_to_lonlat(*GRID_9KM.center(st["r"].to_numpy(), st["c"].to_numpy()))
    st["lon"], st["lat"] = lon, lat
    k = min(N_STRIPS, len(st))
    st["lon_strip"] = pd.qcut(st["lon"].rank(method="first"), k, labels=False).astype(int)
    st["lat_strip"] = pd.qcut(st["lat"].rank(method="first"), k, labels=False).astype(int)
    return st.reset_index()


def _strip_bounds(st: pd.DataFrame, col: str, strip: str) -> dict[int, str]:
    """Each strip's range as people read it: 124.5\u00b0W to 110.2\u00b0W, 25.1\u00b0N to 31.0\u00b0N."""
    from msda.grids import degrees

    g = st.groupby(strip)[col].agg(["min", "max"])
    return {int(i): f"{degrees(r['min'], col)} to {degrees(r['max'], col)}" for i, r in g.iterrows()}


INTERVAL_LEVEL = 0.9


def uncertainty(truth: np.ndarray, pred: np.ndarray, spread: np.ndarray, calibrate_on: np.ndarray,
                score_on: np.ndarray) -> dict[str, float]:
    """How well the member spread measures the error on the ``score_on`` rows (the target
    stations): Spearman correlation of spread with |error|, and the coverage there of a 90 %
    conformal interval whose scale comes from the ``calibrate_on`` rows (the other networks'
    stations, which no fit trains on; msda.calibrate)."""
    from scipy.stats import spearmanr

    from msda.calibrate import conformal_scale, coverage, interval

    out = {"spread_error_spearman": np.nan, "interval_scale": np.nan, "coverage_90": np.nan}
    ok = np.isfinite(spread)
    t, c = score_on & ok, calibrate_on & ok
    if t.sum() > 2:
        out["spread_error_spearman"] = float(spearmanr(spread[t], np.abs(truth[t] - pred[t])).statistic)
    if c.sum() >= 10 and t.any():
        q = conformal_scale(truth[c], pred[c], spread[c], INTERVAL_LEVEL)
        out["interval_scale"] = q
        out["coverage_90"] = coverage(truth[t], *interval(pred[t], spread[t], {"scale": q}))
    return out


def analyse(out: Path, fine: Samples, coarse: Samples, protocol: Protocol, tasks: list[Task]) -> dict[str, pd.DataFrame]:
    """Score every finished task; write and return the result tables (``results/*.parquet``).
    Stages: the finished tasks' predictions, the station draw of every (N, repeat), the scores of
    each task on each of its draws, the summary tables."""
    metas, preds, spreads, done = _finished_tasks(out, tasks, len(fine.frame))
    draws = _draws(metas, fine, coarse, protocol)
    # pretrained is paired with the fits: scored on the draws that have one (all when none has)
    fitted = sorted({(m["n"], m["repeat"]) for m in metas.values() if m["method"] != "pretrained"})
    pretrained_draws = fitted or sorted(draws)
    scoring = _Scoring.of(fine, protocol)
    runs, stations, nets, regions = [], [], [], []
    for key, task in done.items():
        for n, rep in pretrained_draws if task.method == "pretrained" else [(task.n, task.repeat)]:
            run, per_st, per_net, per_strip = scoring.score(task, n, rep, draws[(n, rep)], preds[key], spreads[key],
                                                            metas[key], protocol)
            runs.append(run)
            stations.append(per_st)
            nets.append(per_net)
            regions.extend(per_strip)
    tables = {
        "runs": pd.DataFrame(runs),
        "stations": pd.concat(stations, ignore_index=True) if stations else pd.DataFrame(),
        "networks": pd.concat(nets, ignore_index=True) if nets else pd.DataFrame(),
        "regions": pd.concat(regions, ignore_index=True) if regions else pd.DataFrame(),
    }
    tables["median"] = median_runs(tables["runs"])
    tables["ttests"] = paired_tests(tables["runs"])
    tables["alpha"] = alpha_table(tables["runs"])
    tables["station_info"] = scoring.st
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        with atomic_path(results / f"{name}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    return tables


def _finished_tasks(out: Path, tasks: list[Task], n_rows: int):
    """The finished tasks' records, predictions and spreads by key, and the tasks themselves.
    An unreadable task file counts as not done: msda experiment redoes it."""
    preds: dict[str, np.ndarray] = {}
    spreads: dict[str, np.ndarray] = {}
    metas: dict[str, dict] = {}
    done: dict[str, Task] = {}
    for t in tasks:
        path = out / "tasks" / f"{t.key}.parquet"
        if path.exists():
            try:
                metas[t.key], preds[t.key] = read_task(path)
                spreads[t.key] = read_spread(path)
            except ExperimentError:
                continue
            if len(preds[t.key]) != n_rows:
                raise ExperimentError(f"{path}: {len(preds[t.key])} predictions for a fine table of {n_rows} rows; "
                                      "the table changed since this fit")
            done[t.key] = t
    return metas, preds, spreads, done


def _draws(metas: dict, fine: Samples, coarse: Samples, protocol: Protocol) -> dict:
    """The training stations of every (N, repeat): from the finished fits, else drawn again (the
    pretrained ensemble is scored on every draw, including draws whose fits are pending)."""
    draws = {(m["n"], m["repeat"]): m["train_stations"] for m in metas.values() if m["method"] != "pretrained"}
    for n in protocol.ns:
        for rep in range(protocol.repeats):
            if (n, rep) not in draws:
                from msda.transfer import adapt_problem

                draws[(n, rep)] = adapt_problem(fine, coarse, protocol.network, n, protocol.station_seed(n, rep)).train_stations
    return draws


@dataclass
class _Scoring:
    """The fine table's truth and groupings (stations, networks, strips), for scoring runs."""

    truth: np.ndarray
    st: pd.DataFrame
    station_code: np.ndarray
    networks: list[str]
    net_code: np.ndarray
    in_net: np.ndarray

    @classmethod
    def of(cls, fine: Samples, protocol: Protocol) -> "_Scoring":
        frame = fine.frame
        st = station_table(fine)
        networks = sorted(frame["network"].astype(str).unique())
        return cls(frame[TRUTH].to_numpy(np.float64), st,
                   pd.Categorical(frame["station"].astype(str), categories=st["station"]).codes, networks,
                   pd.Categorical(frame["network"].astype(str), categories=networks).codes,
                   (frame["network"].astype(str) == protocol.network).to_numpy())

    def score(self, task: Task, n: int, rep: int, train_stations, pred: np.ndarray, spread: np.ndarray, meta: dict,
              protocol: Protocol):
        """One task on one draw: its run row, and its per-station, per-network and per-strip scores."""
        st, truth, station_code = self.st, self.truth, self.station_code
        train = set(train_stations)
        is_train_st = st["station"].isin(train).to_numpy()
        row_train = is_train_st[station_code]
        trans = self.in_net & ~row_train
        ind = ~self.in_net
        head = {"n": n, "repeat": rep, "method": task.method, "alpha": task.alpha,
                "variant": task.variant, "train_stations": json.dumps(sorted(train))}
        pooled = grouped_scores(np.where(trans, 0, np.where(ind, 1, -1)), truth, pred, 2)
        per_st = grouped_scores(np.where(row_train, -1, station_code), truth, pred, len(st)).rename(columns=SAMPLES)
        per_st["station"], per_st["network"] = st["station"], st["network"].astype(str).to_numpy()
        per_st["lon"], per_st["lat"] = st["lon"], st["lat"]
        per_st = per_st[~is_train_st & (per_st["samples"] > 0)]
        st_mean = per_st[per_st["network"] == protocol.network][["bias", "r", "rmse", "ubrmse"]].mean()
        run = {
            **head,
            "samples": int(pooled.loc[0, "n"]), **{m: pooled.loc[0, m] for m in METRICS[1:]},
            **{f"station_{m}": st_mean[m] for m in ("bias", "r", "rmse", "ubrmse")},
            "inductive_samples": int(pooled.loc[1, "n"]), **{f"inductive_{m}": pooled.loc[1, m] for m in METRICS[1:]},
            **uncertainty(truth, pred, spread, calibrate_on=ind, score_on=trans),
            "seconds": meta.get("seconds"), "fit_seconds": meta.get("fit_seconds"),
            "station_seed": protocol.station_seed(n, rep),
        }
        pn = grouped_scores(np.where(row_train, -1, self.net_code), truth, pred, len(self.networks)).rename(columns=SAMPLES)
        pn.insert(0, "network", self.networks)
        strips = []
        for col, strip in (("lon", "lon_strip"), ("lat", "lat_strip")):
            codes = st[strip].to_numpy()[station_code]
            ps = grouped_scores(np.where(row_train, -1, codes), truth, pred, N_STRIPS).rename(columns=SAMPLES)
            bounds = _strip_bounds(st, col, strip)
            ps.insert(0, "strip", np.arange(N_STRIPS))
            ps.insert(0, "kind", "longitude" if col == "lon" else "latitude")
            ps.insert(2, "range", [bounds.get(i, "") for i in range(N_STRIPS)])
            strips.append(ps.assign(**head))
        return run, per_st.assign(**head), pn.assign(**head), strips


def median_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, N): the run with the median transductive RMSE (the 5th of 10: the lower
    median for an even count) and the spread of RMSE over the repeats."""
    if runs.empty:
        return pd.DataFrame()
    rows = []
    for (variant, n), g in runs.groupby(["variant", "n"], sort=True):
        g = g.sort_values(["rmse", "repeat"])
        med = g.iloc[(len(g) - 1) // 2]
        rmse = g["rmse"]
        rows.append({
            "variant": variant, "method": med["method"], "alpha": med["alpha"], "n": n, "repeats": len(g),
            "median_repeat": int(med["repeat"]), **{m: med[m] for m in ("bias", "r", "rmse", "ubrmse")},
            "inductive_rmse": med["inductive_rmse"], "station_rmse": med["station_rmse"],
            "rmse_mean": rmse.mean(), "rmse_std": rmse.std(ddof=1) if len(g) > 1 else np.nan,
            "rmse_min": rmse.min(), "rmse_q25": rmse.quantile(0.25), "rmse_q75": rmse.quantile(0.75),
            "rmse_max": rmse.max(),
        })
    return pd.DataFrame(rows)


def paired_tests(runs: pd.DataFrame) -> pd.DataFrame:
    """Per N and pair of variants: paired t-test of transductive RMSE over the shared repeats."""
    from scipy import stats

    if runs.empty:
        return pd.DataFrame()
    rows = []
    for n, g in runs.groupby("n", sort=True):
        wide = g.pivot_table(index="repeat", columns="variant", values="rmse")
        variants = list(wide.columns)
        for i, a in enumerate(variants):
            for b in variants[i + 1 :]:
                pair = wide[[a, b]].dropna()
                diff = pair[a] - pair[b]
                if len(pair) >= 2 and diff.std(ddof=1) > 0:
                    t, p = stats.ttest_rel(pair[a], pair[b])
                else:
                    t, p = np.nan, np.nan
                rows.append({"n": n, "a": a, "b": b, "repeats": len(pair), "rmse_a": pair[a].mean(),
                             "rmse_b": pair[b].mean(), "mean_diff": diff.mean(),
                             "rel_diff_pct": 100 * diff.mean() / pair[b].mean() if len(pair) else np.nan,
                             "t": float(t), "p": float(p)})
    return pd.DataFrame(rows)


def alpha_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 3: median-run RMSE per alpha (rows) and N (columns), MS and MSDA."""
    if runs.empty:
        return pd.DataFrame()
    sub = runs[runs["method"].isin(ALPHA_METHODS)]
    if sub.empty:
        return pd.DataFrame()
    med = median_runs(sub)
    wide = med.pivot_table(index=["method", "alpha"], columns="n", values="rmse")
    wide.columns = [f"N={c}" for c in wide.columns]
    return wide.reset_index()
