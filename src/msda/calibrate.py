"""Intervals that mean what they say: a conformal scale of the ensemble's member spread.

The member spread alone is a weak error bar (members share their training data, so they agree
where they are all wrong). Split conformal prediction (Vovk et al. 2005; Lei et al. 2018,
JASA 113:1094) turns it into an interval with a stated coverage: on samples of stations that
took no part in training, the scores s = |truth - mean| / max(spread, floor) are computed, and
their ceil((n + 1) level)-th smallest value q scales every later interval: mean +- q max(spread,
floor). Coverage holds for new samples exchangeable with the calibration samples; samples of one
station are not independent, so calibrate on as many stations as you can, and check the coverage
on others (``msda experiment`` reports it per method).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from msda.errors import MsdaError

SPREAD_FLOOR = 0.005  # m3/m3: an interval never narrower than +- q x this


def conformal_scale(truth: np.ndarray, mean: np.ndarray, spread: np.ndarray, level: float = 0.9,
                    floor: float = SPREAD_FLOOR) -> float:
    """The split-conformal quantile of |truth - mean| / max(spread, floor) at ``level``."""
    if not 0 < level < 1:
        raise MsdaError(f"--level must lie in (0, 1), got {level}")
    scores = np.abs(truth - mean) / np.maximum(spread, floor)
    scores = scores[np.isfinite(scores)]
    n = len(scores)
    k = math.ceil((n + 1) * level)
    if n == 0 or k > n:
        raise MsdaError(f"{n} calibration samples are too few for a {level:.0%} interval (need at least "
                        f"{math.ceil(level / (1 - level))})")
    # (a millionth more, so that the k-th sample itself stays inside after float32 rounding)
    return float(np.sort(scores)[k - 1]) * (1 + 1e-6)


def interval(mean: np.ndarray, spread: np.ndarray, calibration: dict, lo: float = 0.0,
             hi: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated interval (sm_lo, sm_hi) of predictions, clipped to [lo, hi] when hi is given."""
    half = calibration["scale"] * np.maximum(spread, calibration.get("floor", SPREAD_FLOOR))
    low, high = mean - half, mean + half
    if hi is not None:
        low, high = np.clip(low, lo, hi), np.clip(high, lo, hi)
    return low, high


def coverage(truth: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    return float(np.mean((truth >= low) & (truth <= high)))


def calibrate_weights(weights: str | Path, samples: str | Path, level: float = 0.9, stations: list[str] | None = None,
                      device: str = "cpu") -> dict:
    """Fit the conformal scale of ``weights`` on ``samples`` (stations not used in training) and
    store it in the weights' manifest (``calibration``); returns the record."""
    from msda.io import atomic_path
    from msda.predict import predict
    from msda.tables import read_samples
    from msda.weights import MANIFEST, load_ensemble, read_manifest

    directory = Path(weights)
    if not (directory / MANIFEST).exists():
        raise MsdaError(f"{weights}: calibration is stored in our weights' manifest; convert the authors' .pt "
                        "files first (msda weights convert)")
    ensemble = load_ensemble(directory)
    table = read_samples(samples, "fine", ensemble.schema)
    frame = table.frame
    if stations is not None:
        frame = frame[frame["station"].astype(str).isin(stations)]
    trained_on = set(getattr(ensemble, "provenance", {}).get("train_stations", []) or [])
    overlap = sorted(trained_on & set(frame["station"].astype(str))) if "station" in frame else []
    if overlap:
        raise MsdaError(f"{samples}: stations {overlap[:5]} trained these weights; calibrate on stations the weights "
                        "have not seen")
    pred = predict(ensemble, frame[ensemble.schema.feature_names].to_numpy(np.float32), device=device)
    truth = frame["sm_m3m3"].to_numpy()
    q = conformal_scale(truth, pred.mean, pred.std, level)
    low, high = interval(pred.mean, pred.std, {"scale": q})
    record = {"method": "split conformal, |truth - mean| / max(spread, floor)", "level": level, "scale": q,
              "floor": SPREAD_FLOOR, "samples": int(len(frame)),
              "stations": int(frame["station"].nunique()) if "station" in frame else None,
              "source": str(samples), "coverage_on_calibration": coverage(truth, low, high)}
    manifest = read_manifest(directory)
    manifest["calibration"] = record
    with atomic_path(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return record
