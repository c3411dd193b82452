"""Batched DenseSM-E inference: ensemble mean, per-member predictions and member spread.

Prediction runs through the fastest engine that covers the ensemble's architecture
(``msda.network.engines.inference_engine``): ``FusedEnsemble`` for the default one.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from msda.errors import MsdaError
from msda.io import atomic_path, check_output
from msda.runtime import bar_interval, resolve_device
from msda.network.engines import inference_engine
from msda.network.fused import FusedEnsemble
from msda.network.model import DenseSME
from msda.tables import iter_feature_chunks


@dataclass
class Prediction:
    """Soil moisture predictions in m3/m3: ensemble mean, member spread (std) and members."""

    mean: np.ndarray  # (n,)
    std: np.ndarray  # (n,) population std over members (ddof=0)
    members: np.ndarray  # (n, n_members)
    member_names: list[str]

    def bounded(self, hi: float, lo: float = 0.0) -> tuple["Prediction", np.ndarray]:
        """The prediction with its mean clipped to [lo, hi], and a flag per row (``CLIPPED``
        where the mean was outside). Member values and spread stay as the networks gave them."""
        outside = (self.mean < lo) | (self.mean > hi)
        flags = np.where(outside, CLIPPED, 0).astype(np.uint8)
        return dataclasses.replace(self, mean=np.clip(self.mean, lo, hi)), flags

    def frame(self, with_members: bool = True) -> pd.DataFrame:
        d = {"sm_pred": self.mean, "sm_std": self.std}
        if with_members:
            d.update({name: self.members[:, i] for i, name in enumerate(self.member_names)})
        return pd.DataFrame(d)




# bit flags of a prediction (the ``flag`` column of predict, the ``mask`` of map)
NODATA, OUT_OF_RANGE, OUT_OF_TRAINING, CLIPPED = 1, 2, 4, 8
FLAG_MEANINGS = "nodata_input outside_schema_range outside_training_range clipped_to_physical_range"


def input_flags(x: np.ndarray, ranges: tuple[np.ndarray, np.ndarray] | None = None, tol: float = 1e-4) -> np.ndarray:
    """Per row of normalised inputs: ``OUT_OF_RANGE`` where a feature lies outside [0, 1] (the
    schema's range) and ``OUT_OF_TRAINING`` outside ``ranges`` (per-feature lo, hi of the
    training samples, normalised), one feature at a time (no feature-sized temporaries)."""
    flags = np.zeros(len(x), np.uint8)
    out = np.zeros(len(x), bool)
    far = np.zeros(len(x), bool)
    for j in range(x.shape[1]):
        col = x[:, j]
        out |= (col < -tol) | (col > 1 + tol)
        if ranges is not None:
            far |= (col < ranges[0][j] - tol) | (col > ranges[1][j] + tol)
    flags[out] |= OUT_OF_RANGE
    flags[far] |= OUT_OF_TRAINING
    return flags


class PredictionError(MsdaError):
    """A prediction that is not a finite number."""


def predict(
    ensemble: DenseSME | FusedEnsemble,
    x: np.ndarray | torch.Tensor,
    batch_size: int = 4096,
    device: str | torch.device | None = "cpu",
    compile: bool = False,
    rows: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> Prediction:
    """Predict normalised inputs x (n, n_features) in batches, without gradients.

    ``rows``: predict only these rows of x (gathered batch by batch, no copy of x). A
    non-finite prediction is a PredictionError naming its rows (``labels``: their names, e.g.
    row numbers of the table they came from).
    """
    engine = (
        ensemble
        if not isinstance(ensemble, DenseSME)
        else inference_engine(ensemble.eval(), resolve_device(device), compile=compile)
    )
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
    x = x.to(torch.float32)
    index = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    outs = []
    for start in range(0, x.shape[0] if index is None else len(index), batch_size):
        xb = x[start : start + batch_size] if index is None else x[index[start : start + batch_size]]
        xb = xb.to(engine.device, non_blocking=True)
        outs.append(engine.member_outputs(xb).cpu())
    members = torch.cat(outs).numpy() if outs else np.empty((0, engine.n_members), np.float32)
    bad = ~np.isfinite(members).all(axis=1)
    if bad.any():
        where = np.flatnonzero(bad) if rows is None else np.asarray(rows)[bad]
        named = where if labels is None else np.asarray(labels)[where]
        member = engine.names[int(np.argmax(~np.isfinite(members[np.argmax(bad)])))]
        shown = ", ".join(str(v) for v in named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        raise PredictionError(
            f"{int(bad.sum())} rows give non-finite predictions (first from member {member}) at rows {shown}: "
            "check those inputs and the weights"
        )
    return Prediction(
        mean=members.mean(axis=1),
        std=members.std(axis=1),
        members=members,
        member_names=list(engine.names),
    )


def predict_table(
    ensemble: DenseSME,
    table: str | Path,
    out: str | Path,
    chunk_rows: int = 200_000,
    batch_size: int = 4096,
    device: str | torch.device | None = "cpu",
    with_members: bool = True,
    drop_nan: bool = False,
    progress: bool = True,
    compile: bool = False,
    force: bool = False,
    clip: bool = True,
    ranges: tuple[np.ndarray, np.ndarray] | None = None,
) -> int:
    """Stream ``table`` through the ensemble into ``out`` (.parquet or .csv); returns rows written.

    ``sm_pred`` is clipped to [0, the schema's truth_max] (``clip=False`` keeps the raw mean)
    and ``flag`` holds, per row, the bits ``OUT_OF_RANGE`` (an input outside the schema's range),
    ``OUT_OF_TRAINING`` (outside ``ranges``, the training samples' per-feature range) and
    ``CLIPPED``. Weights calibrated by ``msda calibrate`` add the interval ``sm_lo``, ``sm_hi`` at
    their level. Memory is bounded by ``chunk_rows``; ``out`` appears only when complete, and
    replaces only an earlier prediction table (or anything with ``force``), never ``table``.
    """
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise MsdaError(f"{out}: output must end in .parquet or .csv")
    check_output(out, "predictions", (table,), force)
    from msda.calibrate import interval

    calibration = getattr(ensemble, "calibration", None)
    engine = inference_engine(ensemble.eval(), resolve_device(device), compile=compile)
    rows = 0
    with atomic_path(out, "predictions", inputs=(table,), force=force) as tmp:
        writer = None
        bar = tqdm(desc="predict", unit=" samples", disable=not progress, mininterval=bar_interval())
        try:
            for ids, feats in iter_feature_chunks(table, ensemble.schema, chunk_rows, drop_nan):
                try:
                    pred = predict(engine, feats, batch_size=batch_size, labels=ids.index.to_numpy())
                except PredictionError as exc:
                    raise PredictionError(f"{table}: {exc}") from None
                flags = input_flags(feats, ranges)
                if clip:
                    pred, clipped = pred.bounded(ensemble.schema.truth_max)
                    flags |= clipped
                frame = pd.concat([ids.reset_index(drop=True), pred.frame(with_members)], axis=1)
                at = len(ids.columns) + 2
                if calibration is not None:  # the conformal interval of msda calibrate
                    low, high = interval(pred.mean, pred.std, calibration, hi=ensemble.schema.truth_max if clip else None)
                    frame.insert(at, "sm_lo", low.astype(np.float32))
                    frame.insert(at + 1, "sm_hi", high.astype(np.float32))
                    at += 2
                frame.insert(at, "flag", flags)
                if out.suffix.lower() == ".csv":
                    frame.to_csv(tmp, mode="a", header=rows == 0, index=False, float_format="%.6g")
                else:
                    batch = pa.Table.from_pandas(frame, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, batch.schema)
                    writer.write_table(batch)
                rows += len(frame)
                bar.update(len(frame))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if rows == 0:
            raise MsdaError(f"{table}: no rows to predict")
    return rows
