"""Figures like the paper's Fig. 4-9 and Table 3, and one self-contained HTML report."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from msda.figures import count_colorbar, plain  # noqa: E402
from msda.grids import degrees  # noqa: E402
from msda.io import atomic_path  # noqa: E402
from msda.metrics import scores  # noqa: E402

# METHOD.md section 8: the paper's MSDA (alpha 0.7) median RMSE on SCAN, real data
PAPER_MSDA_RMSE = {0: 0.098, 1: 0.089, 5: 0.082, 9: 0.079, 13: 0.078, 17: 0.077, 21: 0.076, 29: 0.075, 37: 0.072, 45: 0.071}
METRIC_LABELS = (("rmse", "RMSE (m$^3$/m$^3$)"), ("r", "R"), ("bias", "bias (m$^3$/m$^3$)"), ("ubrmse", "ubRMSE (m$^3$/m$^3$)"))
FIGURES = (
    ("metrics_vs_n", "Metrics against N (Fig. 6)",
     "Median run (line) and the interquartile range over repeats (band) of each method on the target stations."),
    ("scatter", "Measured against predicted per N (Fig. 4)", "Median run of the main method, target stations."),
    ("regions", "Regional strips (Fig. 5)",
     "RMSE per longitudinal and latitudinal strip (about equal station counts) at the largest N, every station not trained on."),
    ("station_map", "Station map of RMSE (Fig. 9)", "Per-station RMSE at the largest N; crosses: training stations."),
    ("timeseries", "One station's time series (Fig. 7)", "A target station at the smallest N: in situ, SMAP 9 km and each method."),
    ("networks", "Inductive RMSE per network (Fig. 8)", "The adapted models applied unchanged to the other networks."),
)


DEFINITIONS = (
    "<b>Transductive</b>: the network adapted to; N of its stations train the model and the others, never "
    "seen in training, are the target and test set. <b>Inductive</b>: the adapted model applied unchanged to "
    "the other networks. <b>ubRMSE</b>: the RMSE after removing the mean bias, sqrt(RMSE<sup>2</sup> - "
    "bias<sup>2</sup>). Each method's figure at N is its <b>median run</b> over the station draws (the lower "
    "median by transductive RMSE); differences are paired t-tests of RMSE over the same draws."
)


def take_home(median: pd.DataFrame, ttests: pd.DataFrame, alpha: float = 0.05) -> str:
    """One or two sentences from the results: the best method per N by median-run RMSE, and
    whether its margin over the runner-up is significant (paired t-test over repeats)."""
    if median.empty:
        return "No fit has finished yet."
    best_at: dict[str, list[int]] = {}
    sig, not_sig = [], []
    for n, g in median.groupby("n", sort=True):
        g = g.sort_values("rmse")
        best = g.iloc[0]["variant"]
        best_at.setdefault(best, []).append(int(n))
        if len(g) < 2:
            continue
        second = g.iloc[1]["variant"]
        pair = ttests[(ttests["n"] == n) & (((ttests["a"] == best) & (ttests["b"] == second))
                                            | ((ttests["a"] == second) & (ttests["b"] == best)))] if not ttests.empty else ttests
        p = float(pair["p"].iloc[0]) if len(pair) else np.nan
        (sig if p < alpha else not_sig).append(f"{int(n)} (over {second}, p = {p:.2g})" if np.isfinite(p)
                                               else f"{int(n)} (over {second}, no test)")
    first = "; ".join(f"{v} at N = {', '.join(map(str, ns))}" for v, ns in
                      sorted(best_at.items(), key=lambda kv: -len(kv[1])))
    text = f"Lowest median-run RMSE on the target stations: {first}."
    if sig and not_sig:
        text += f" The margin over the runner-up is significant at N = {'; '.join(sig)}, and not at N = {'; '.join(not_sig)}."
    elif sig:
        text += f" The margin over the runner-up is significant at every N: {'; '.join(sig)}."
    elif not_sig:
        text += f" The margin over the runner-up is significant at no N: {'; '.join(not_sig)}."
    return text


def _colours(variants: list[str]) -> dict[str, str]:
    return {v: f"C{i}" for i, v in enumerate(variants)}


def _order(variants) -> list[str]:
    rank = {"pretrained": 0, "finetune": 1, "ms": 2, "da": 3, "msda": 4}
    return sorted(set(variants), key=lambda v: (rank.get(v.split(" ")[0], 9), v))


def main_variant(median: pd.DataFrame) -> str:
    """The variant the single-method figures show: MSDA (alpha 0.7 if run), else the last one."""
    variants = _order(median["variant"])
    for want in ("msda (0.7)", "msda"):
        if want in variants:
            return want
    msda = [v for v in variants if v.startswith("msda")]
    return msda[0] if msda else variants[-1]


def _task_pred(out: Path, method: str, n: int, repeat: int, alpha) -> np.ndarray:
    from msda.runs import Task, read_task

    key = Task(n, repeat, method, None if alpha is None or pd.isna(alpha) else float(alpha)).key
    return read_task(out / "tasks" / f"{key}.parquet")[1]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def fig_metrics_vs_n(runs: pd.DataFrame, median: pd.DataFrame, path: Path) -> None:
    variants = _order(median["variant"])
    col = _colours(variants)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, (metric, label) in zip(axes, METRIC_LABELS):
        shown = []
        for v in variants:
            med = median[median["variant"] == v].sort_values("n")
            q = runs[runs["variant"] == v].groupby("n")[metric].quantile([0.25, 0.75]).unstack().loc[med["n"]]
            ax.plot(med["n"], med[metric], "o-", color=col[v], label=v, ms=4)
            ax.fill_between(med["n"], q[0.25], q[0.75], color=col[v], alpha=0.15, lw=0)
            shown += [med[metric].to_numpy(), q[0.25].to_numpy(), q[0.75].to_numpy()]
        if metric == "rmse":
            paper = {n: r for n, r in PAPER_MSDA_RMSE.items() if n in set(median["n"])}
            if paper:
                ax.plot(list(paper), list(paper.values()), "k:", marker="x", label="paper MSDA (real data)")
                shown.append(np.array(list(paper.values())))
        vals = np.concatenate(shown)
        lo, hi = np.nanmin(vals), np.nanmax(vals)
        pad = 0.08 * (hi - lo) if hi > lo else 0.01
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training stations N")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def fig_scatter(out: Path, fine_truth: np.ndarray, trans_rows, median: pd.DataFrame, variant: str, path: Path) -> None:
    med = median[median["variant"] == variant].sort_values("n")
    k = len(med)
    ncol = min(k, 5)
    nrow = -(-k // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol + 0.6, 3.2 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax in axes.ravel()[k:]:
        ax.set_visible(False)
    hi = float(np.nanpercentile(fine_truth, 99.5)) * 1.15
    for ax, (_, row) in zip(axes.ravel(), med.iterrows()):
        pred = _task_pred(out, row["method"], int(row["n"]), int(row["median_repeat"]), row["alpha"])
        rows = trans_rows(int(row["n"]), int(row["median_repeat"]))
        t, p = fine_truth[rows], pred[rows]
        s = scores(t, p)
        hb = ax.hexbin(t, p, gridsize=50, extent=(0, hi, 0, hi), bins="log", mincnt=1, cmap="viridis")
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(f"N = {int(row['n'])}: RMSE {s['rmse']:.3f}, R {s['r']:.2f}", fontsize=9)
        ax.set_xlabel("in situ (m$^3$/m$^3$)")
        count_colorbar(fig, ax, hb)
    for r in range(nrow):
        axes[r][0].set_ylabel(f"{variant} (m$^3$/m$^3$)")
    _save(fig, path)


def _median_rows(table: pd.DataFrame, median: pd.DataFrame, n: int) -> pd.DataFrame:
    m = median[median["n"] == n][["variant", "median_repeat"]].rename(columns={"median_repeat": "repeat"})
    return table[table["n"] == n].merge(m, on=["variant", "repeat"])


def fig_regions(regions: pd.DataFrame, median: pd.DataFrame, path: Path) -> None:
    n = int(median["n"].max())
    sub = _median_rows(regions, median, n)
    variants = _order(sub["variant"])
    col = _colours(variants)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    width = 0.8 / max(len(variants), 1)
    for ax, kind in zip(axes, ("longitude", "latitude")):
        part = sub[sub["kind"] == kind]
        labels = part.drop_duplicates("strip").sort_values("strip")["range"].tolist()
        for i, v in enumerate(variants):
            pv = part[part["variant"] == v].sort_values("strip")
            ax.bar(pv["strip"] + (i - (len(variants) - 1) / 2) * width, pv["rmse"], width, color=col[v], label=v)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        if len(part):
            ax.set_ylim(0, 1.08 * float(part["rmse"].max()))
        ax.set_title(f"{kind} strips, N = {n}")
        ax.set_ylabel("RMSE (m$^3$/m$^3$)")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def fig_station_map(stations: pd.DataFrame, median: pd.DataFrame, st_info: pd.DataFrame, variant: str, path: Path) -> None:
    n = int(median["n"].max())
    sub = _median_rows(stations, median, n)
    shown = [v for v in ("pretrained", variant) if v in set(sub["variant"])]
    fig, axes = plt.subplots(1, len(shown), figsize=(6.2 * len(shown), 3.8), squeeze=False)
    vmax = float(np.nanpercentile(sub["rmse"], 95)) if len(sub) else 0.1
    for ax, v in zip(axes[0], shown):
        pv = sub[sub["variant"] == v]
        sc = ax.scatter(pv["lon"], pv["lat"], c=pv["rmse"], s=14, cmap="magma_r", vmin=0, vmax=vmax)
        train = set(json.loads(pv["train_stations"].iloc[0])) if len(pv) else set()
        tr = st_info[st_info["station"].isin(train)]
        ax.scatter(tr["lon"], tr["lat"], marker="x", color="k", s=30, label="training stations")
        ax.set_title(f"{v}, N = {n}: station RMSE, mean {pv['rmse'].mean():.3f}", fontsize=9)
        ax.xaxis.set_major_formatter(lambda x, _: degrees(x, "lon", 0))
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude (\u00b0N)")
        ax.set_aspect(1.25)
        fig.colorbar(sc, ax=ax, label="RMSE (m$^3$/m$^3$)", shrink=0.85)
        ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


def fig_timeseries(out, runs, fine_frame, coarse_frame, truth_col, median, variant, network, path) -> None:
    n = int(median["n"].min())
    rep = int(median[(median["variant"] == variant) & (median["n"] == n)]["median_repeat"].iloc[0])
    train = set(json.loads(runs[(runs["n"] == n) & (runs["repeat"] == rep)]["train_stations"].iloc[0]))
    preds = {}
    for v in _order(median["variant"]):
        row = median[(median["variant"] == v) & (median["n"] == n)].iloc[0]
        if row["method"] == "pretrained":
            preds[v] = _task_pred(out, "pretrained", 0, 0, None)
        elif ((runs["variant"] == v) & (runs["n"] == n) & (runs["repeat"] == rep)).any():
            preds[v] = _task_pred(out, row["method"], n, rep, row["alpha"])
    target = fine_frame[(fine_frame["network"].astype(str) == network) & ~fine_frame["station"].astype(str).isin(train)]
    station = target["station"].astype(str).value_counts().index[0]
    rows = np.flatnonzero((fine_frame["station"].astype(str) == station).to_numpy())
    sub = fine_frame.iloc[rows]
    dates = pd.to_datetime(sub["date"]).to_numpy()
    order = np.argsort(dates)
    truth = sub[truth_col].to_numpy()
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.plot(dates[order], truth[order], "ko", ms=3, label="in situ")
    cell = coarse_frame[(coarse_frame["r"] == sub["r"].iloc[0]) & (coarse_frame["c"] == sub["c"].iloc[0])]
    if len(cell):
        smap = cell.groupby("date")[truth_col].mean()
        ax.plot(pd.to_datetime(smap.index), smap.to_numpy(), "s", color="0.55", ms=3, label="SMAP 9 km")
    col = _colours(list(preds))
    for v, p in preds.items():
        s = scores(truth, p[rows])
        ax.plot(dates[order], p[rows][order], "-", color=col[v], lw=1, label=f"{v} (RMSE {s['rmse']:.3f})")
    ax.set_ylabel("soil moisture (m$^3$/m$^3$)")
    ax.set_title(plain(f"{station} ({network}), a target station; N = {n}, repeat {rep}"))
    ax.legend(fontsize=7, ncol=4)
    _save(fig, path)


def fig_networks(networks: pd.DataFrame, median: pd.DataFrame, network: str, path: Path) -> None:
    n = int(median["n"].max())
    sub = _median_rows(networks, median, n)
    sub = sub[sub["network"] != network]
    variants = _order(sub["variant"])
    col = _colours(variants)
    names = sorted(sub["network"].unique())
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        pv = sub[sub["variant"] == v].set_index("network").reindex(names)
        ax.bar(np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width, pv["rmse"], width, color=col[v], label=v)
    ax.set_xticks(range(len(names)), [plain(n) for n in names], fontsize=8)
    ax.set_ylabel("RMSE (m$^3$/m$^3$)")
    ax.set_title(plain(f"inductive: models adapted on {network} with N = {n}, applied to the other networks"))
    ax.legend(fontsize=7)
    _save(fig, path)


# ----- HTML ---------------------------------------------------------------------------------
def _table(frame: pd.DataFrame, fmt: str = "{:.4f}") -> str:
    return frame.to_html(index=False, float_format=lambda v: fmt.format(v), na_rep="", border=0, classes="t")


def _img(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def make_figures(out: Path, tables: dict[str, pd.DataFrame], record: dict) -> list[tuple[str, str, str, Path]]:
    """Draw every figure the finished runs allow; returns (name, title, caption, path)."""
    from msda.runs import Inputs, load_inputs

    runs, median = tables["runs"], tables["median"]
    if runs.empty:
        return []
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    network = record["protocol"]["network"]
    inputs = Inputs(**record["inputs"])
    fine, coarse, _ = load_inputs(inputs, tuple(record["protocol"]["members"]))
    frame = fine.frame
    truth_col = "sm_m3m3" if "sm_m3m3" in frame else frame.columns[frame.columns.str.contains("sm")][0]
    truth = frame[truth_col].to_numpy(np.float64)
    st_code = frame["station"].astype(str).to_numpy()
    in_net = (frame["network"].astype(str) == network).to_numpy()
    draws = runs.drop_duplicates(["n", "repeat"]).set_index(["n", "repeat"])["train_stations"]

    def trans_rows(n: int, rep: int) -> np.ndarray:
        train = set(json.loads(draws.loc[(n, rep)]))
        return in_net & ~np.isin(st_code, list(train))

    variant = main_variant(median)
    fitted = median[median["method"] != "pretrained"]
    drawn = []
    jobs = {
        "metrics_vs_n": lambda p: fig_metrics_vs_n(runs, median, p),
        "scatter": lambda p: fig_scatter(out, truth, trans_rows, median, variant, p),
        "regions": lambda p: fig_regions(tables["regions"], median, p),
        "station_map": lambda p: fig_station_map(tables["stations"], median, tables["station_info"], variant, p),
        "timeseries": lambda p: fig_timeseries(out, runs, frame, coarse.frame, truth_col, median, variant, network, p),
        "networks": lambda p: fig_networks(tables["networks"], median, network, p),
    }
    for name, title, caption in FIGURES:
        if name != "metrics_vs_n" and fitted.empty:
            continue
        path = figdir / f"{name}.png"
        jobs[name](path)
        drawn.append((name, title, caption.replace("main method", variant), path))
    return drawn


def write_report(out: Path, tables: dict[str, pd.DataFrame], record: dict) -> Path:
    """``out/report.html``: settings, the median-RMSE table, spreads, t-tests, alpha table, figures."""
    out = Path(out)
    figures = make_figures(out, tables, record)
    proto = record["protocol"]
    runs, median, tt = tables["runs"], tables["median"], tables["ttests"]
    from msda.runs import Protocol

    keys = {t.key for t in Protocol.from_dict(proto).tasks()}
    n_tasks = sum(p.stem in keys for p in (out / "tasks").glob("*.parquet"))  # this protocol's, not older ones
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>msda experiment</title><style>",
        ".take{font-size:17px;background:#eef5ff;border:1px solid #9bbce6;padding:0.6em 1em}"
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        ".t td,.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
        ".quick{background:#fff3cd;border:1px solid #e0c36a;padding:0.6em 1em}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}",
        "</style></head><body>",
        f"<h1>msda experiment: {html.escape(proto['network'])}, transductive and inductive</h1>",
        f"<p class='take'><b>Take-home.</b> {html.escape(take_home(median, tt))}</p>",
        f"<p>{DEFINITIONS}</p>",
    ]
    if proto.get("quick"):
        parts.append("<p class='quick'><b>Quick run</b> (demo): fewer members, epochs, N values and repeats than "
                     "the paper's protocol. The figures show the machinery; the numbers are not the paper's setting.</p>")
    parts.append(
        f"<p>Inputs: fine <code>{html.escape(str(record['inputs']['fine']))}</code>, 9 km "
        f"<code>{html.escape(str(record['inputs']['coarse']))}</code>, weights "
        f"<code>{html.escape(str(record['inputs']['weights']))}</code> ({len(record['members'])} members). "
        f"{n_tasks} of {record.get('n_tasks', n_tasks)} fits finished, {len(runs)} scored runs "
        f"(the pretrained model is scored on every station draw). msda {record.get('msda')}, torch {record.get('torch')}, "
        f"made {record.get('created')}.</p>"
    )
    settings = pd.DataFrame([{k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in proto.items()}])
    parts += ["<h2>Protocol</h2>", _table(settings.T.reset_index().set_axis(["setting", "value"], axis=1))]
    if not median.empty:
        wide = median.pivot_table(index="variant", columns="n", values="rmse").reindex(_order(median["variant"]))
        wide.columns = [f"N={c}" for c in wide.columns]
        paper = pd.DataFrame([{f"N={n}": PAPER_MSDA_RMSE.get(n, np.nan) for n in sorted(median["n"].unique())}],
                             index=["paper MSDA 0.7 (real data)"])
        parts += ["<h2>Median-RMSE run per method and N (target stations, m<sup>3</sup>/m<sup>3</sup>)</h2>",
                  _table(pd.concat([wide, paper]).reset_index().rename(columns={"index": "variant"})),
                  "<p>The paper's figures are on real data; on synthetic data only the direction of the comparisons "
                  "is meaningful (docs/method.md, docs/simulate.md).</p>"]
        for metric, label in (("r", "R"), ("bias", "bias"), ("ubrmse", "ubRMSE"), ("inductive_rmse", "inductive RMSE (other networks)")):
            w = median.pivot_table(index="variant", columns="n", values=metric).reindex(_order(median["variant"]))
            w.columns = [f"N={c}" for c in w.columns]
            parts += [f"<h3>{label} of the median run</h3>", _table(w.reset_index())]
        spread = median[["variant", "n", "repeats", "rmse_mean", "rmse_std", "rmse_min", "rmse_q25", "rmse_q75", "rmse_max"]]
        parts += ["<h2>Spread of RMSE over repeats</h2>", _table(spread)]
    if not tt.empty:
        mv = main_variant(median)
        sel = tt[(tt["a"] == mv) | (tt["b"] == mv)]
        parts += [f"<h2>Paired t-tests against {html.escape(mv)} (RMSE over repeats)</h2>",
                  "<p>mean_diff = RMSE(a) - RMSE(b); rel_diff_pct relative to b.</p>", _table(sel, "{:.4g}")]
    if not tables["alpha"].empty:
        parts += ["<h2>Alpha (Table 3): median-run RMSE</h2>", _table(tables["alpha"])]
    for name, title, caption, path in figures:
        parts.append(f"<figure><h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,{_img(path)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    fingerprints = record.get("fingerprints") or {}
    made = pd.DataFrame([{"input": k, "path": v, "sha256": str(fingerprints.get(k) or "")[7:23]}
                         for k, v in record["inputs"].items() if v])
    parts += ["<h2>Run record</h2>", _table(made),
              f"<p>Members: {html.escape(', '.join(record.get('members', [])))}. msda {record.get('msda')}, torch "
              f"{record.get('torch')}, Python {record.get('python')}; <code>protocol.json</code> holds the whole "
              "record.</p></body></html>"]
    target = out / "report.html"
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(parts))
    return target
