"""Accuracy metrics of soil moisture retrievals (METHOD.md section 6): bias, R, RMSE, ubRMSE."""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = ("n", "bias", "r", "rmse", "ubrmse")


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Bias (pred - truth), Pearson R, RMSE and ubRMSE (RMSE after removing the mean bias)."""
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    ok = np.isfinite(truth) & np.isfinite(pred)
    truth, pred = truth[ok], pred[ok]
    n = truth.size
    if n == 0:
        return {"n": 0, "bias": np.nan, "r": np.nan, "rmse": np.nan, "ubrmse": np.nan}
    err = pred - truth
    bias = float(err.mean())
    rmse = float(np.sqrt(np.mean(err**2)))
    ubrmse = float(np.sqrt(max(rmse**2 - bias**2, 0.0)))
    if n > 1 and truth.std() > 0 and pred.std() > 0:
        r = float(np.corrcoef(truth, pred)[0, 1])
    else:
        r = np.nan
    return {"n": int(n), "bias": bias, "r": r, "rmse": rmse, "ubrmse": ubrmse}


def scores_by(frame: pd.DataFrame, truth: str, pred: str, by: str | list[str]) -> pd.DataFrame:
    """``scores`` per group of ``by`` (e.g. per station), one row per group."""
    rows = []
    for key, g in frame.groupby(by, sort=True):
        rows.append({**dict(zip([by] if isinstance(by, str) else by, key if isinstance(key, tuple) else (key,))), **scores(g[truth].to_numpy(), g[pred].to_numpy())})
    return pd.DataFrame(rows)


def grouped_scores(codes: np.ndarray, truth: np.ndarray, pred: np.ndarray, n_groups: int) -> pd.DataFrame:
    """``scores`` for many groups at once (codes 0..n_groups-1), from per-group sums.

    One pass of ``np.bincount`` per moment, so that thousands of stations times hundreds of runs
    stay cheap; equal to ``scores`` per group up to rounding. Row i is group i.
    """
    codes = np.asarray(codes, dtype=np.int64)
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    ok = np.isfinite(truth) & np.isfinite(pred) & (codes >= 0)
    codes, truth, pred = codes[ok], truth[ok], pred[ok]

    def total(w: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(codes, weights=w, minlength=n_groups)[:n_groups]

    n = total()
    err = pred - truth
    with np.errstate(invalid="ignore", divide="ignore"):
        bias = total(err) / n
        mse = total(err * err) / n
        rmse = np.sqrt(mse)
        ubrmse = np.sqrt(np.maximum(mse - bias**2, 0.0))
        mt, mp = total(truth) / n, total(pred) / n
        vt = total(truth * truth) / n - mt**2
        vp = total(pred * pred) / n - mp**2
        cov = total(truth * pred) / n - mt * mp
        good = (n > 1) & (vt > 1e-14 * np.maximum(mt**2, 1e-12)) & (vp > 1e-14 * np.maximum(mp**2, 1e-12))
        r = np.where(good, cov / np.sqrt(np.where(good, vt * vp, 1.0)), np.nan)
    empty = n == 0
    frame = pd.DataFrame({"n": n.astype(np.int64), "bias": bias, "r": np.clip(r, -1, 1), "rmse": rmse, "ubrmse": ubrmse})
    frame.loc[empty, ["bias", "r", "rmse", "ubrmse"]] = np.nan
    return frame
