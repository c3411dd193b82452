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
