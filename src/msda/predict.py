"""Batched DenseSM-E inference: ensemble mean, per-member predictions and member spread.

Prediction runs through ``FusedEnsemble``, an eval-mode copy of the ensemble in which every
BatchNorm is folded into the layer before or after it. On CPU the convolution stage of all
members runs in C, per sample and in cache (msda/native.py); elsewhere, or without a C
compiler, as three grouped convolutions. It computes the same function as
``DenseSME.eval()`` (tested to float32 rounding) with far fewer, larger operations.
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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from msda import native
from msda.errors import MsdaError
from msda.io import atomic_path, check_output
from msda.runtime import bar_interval, resolve_device
from msda.model import CONV_FILTERS, KERNEL, POOL_WINDOWS, DenseSM, DenseSME, pooled_length
from msda.stacked import _pair_sum
from msda.tables import iter_feature_chunks

assert POOL_WINDOWS[:2] == (2, 2), "the fused convolutions pool pairs (their 1/2 is folded into the weights)"


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


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_after(layer: nn.Linear | nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(layer(x))`` as one layer."""
    scale, shift = _bn_affine(bn)
    w = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    return w, layer.bias * scale + shift


class _FusedMember(nn.Module):
    """The dense part of one member after the convolutions, BatchNorms folded."""

    def __init__(self, m: DenseSM):
        super().__init__()
        self.norm_scale, self.norm_shift = (t.detach().clone() for t in _bn_affine(m.norm))
        self.blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for blk in m.dense_layers:
            self.blocks.append(
                [
                    tuple(t.detach().t().contiguous() if t.dim() == 2 else t.detach().clone() for t in _fold_after(lin, bn))
                    for lin, bn in ((blk.linear1, blk.bn1), (blk.linear2, blk.bn2), (blk.linear3, blk.bn3))
                ]
            )
        fc = m.fc_layers[0]
        self.fc_w = fc.linear1.weight.detach().t().contiguous()
        self.fc_b = fc.linear1.bias.detach().clone()
        # out(bn(relu(z))) = (w_out * scale) . relu(z) + (w_out . shift + b_out)
        scale, shift = _bn_affine(fc.bn1)
        self.feat_scale, self.feat_shift = scale.detach().clone(), shift.detach().clone()
        self.out_w = (m.out.weight[0] * scale).detach().reshape(-1, 1).contiguous()
        self.out_b = (m.out.weight[0] @ shift + m.out.bias[0]).detach().reshape(1)

    def to_device(self, device: torch.device) -> "_FusedMember":
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        self.blocks = [[(w.to(device), b.to(device)) for w, b in blk] for blk in self.blocks]
        return self

    def forward(self, h0: torch.Tensor, features: bool = False):
        """The member's output (B,), and with ``features`` also its bottleneck features (B, 32)."""
        x = torch.addcmul(self.norm_shift, h0, self.norm_scale)
        for (w1, b1), (w2, b2), (w3, b3) in self.blocks:
            h = torch.addmm(b1, x, w1).relu_()
            h = torch.addmm(b2, h, w2).relu_()
            h = torch.addmm(b3, h, w3).relu_()
            x = torch.cat((h, x), dim=1)
        z = torch.addmm(self.fc_b, x, self.fc_w).relu_()
        out = torch.addmm(self.out_b, z, self.out_w).squeeze(1)
        return (out, torch.addcmul(self.feat_shift, z, self.feat_scale)) if features else out


def _replicate_pad(x: torch.Tensor, dim: int, pad: int = KERNEL // 2) -> torch.Tensor:
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat((*[first] * pad, x, *[last] * pad), dim=dim)


def _grouped_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """relu(conv1d) of every member, (batch, steps, members * c_in) -> (batch, steps, members * c_out).

    One grouped convolution (oneDNN on CPU) on steps-major ("channels-last") tensors: the
    replicate-padded input is read in place and the output comes back steps-major, no copies.
    """
    x4 = _replicate_pad(h, 1).transpose(1, 2).unsqueeze(2)  # (B, C, 1, L + 4), channels-last strides
    y = F.conv2d(x4, weight, bias, groups=groups)  # (B, C_out, 1, L), channels-last
    return y.squeeze(2).transpose(1, 2).relu_()


class FusedEnsemble:
    """Inference-only DenseSM-E: folded BatchNorms, all members' convolutions at once.

    On CPU the convolution stage runs in C (``native``, below). Otherwise, in PyTorch,
    convolutions run steps-major ("channels-last"): the first (shared input) as one GEMM over
    all members, the next two as grouped convolutions (one group per member). The factor 1/2 of
    the first two average poolings is folded into their weights (relu(z / 2) = relu(z) / 2, exact
    in floating point), so that pooling is one addition of two strided views. They run on
    sub-batches of ``conv_batch`` samples, small enough to stay in cache; the dense part runs
    on the whole batch.
    ``compile=True`` runs the PyTorch convolution stage through ``torch.compile`` (a one-off
    compilation of some seconds; needs a C++ compiler on CPU), for GPUs; on CPU the C stage is
    faster (README).
    ``native``: run the convolution stage in C (msda/native.py); None (default) does so on CPU
    when the kernel builds and covers the architecture and ``compile`` is off, True insists.
    """

    def __init__(
        self,
        ensemble: DenseSME,
        device: str | torch.device = "cpu",
        conv_batch: int | None = None,
        compile: bool = False,
        native: bool | None = None,
    ):
        self.device = torch.device(device)
        self.conv_batch = conv_batch or 64
        self._conv = torch.compile(self._conv_features, dynamic=False) if compile else self._conv_features
        self.compiled = compile
        self.names = ensemble.names
        members = list(ensemble.members)
        first = members[0]
        self.n_scalars, self.n_series, self.length = first.n_scalars, first.n_series, first.length
        m = self.n_members = len(members)
        with torch.no_grad():
            folded = []
            for i in (1, 2, 3):
                pairs = [_fold_after(getattr(mb.conv_block, f"conv{i}"), getattr(mb.conv_block, f"bn{i}")) for mb in members]
                folded.append((torch.cat([p[0] for p in pairs]).detach(), torch.cat([p[1] for p in pairs]).detach()))
            (w1, b1), (w2, b2), (w3, b3) = folded
            self.c1 = w1.shape[0] // m
            half = 0.5  # the first two poolings average pairs
            # conv1: (M*C1, S, K) -> (S*K + 1, M*C1), rows ordered (channel, tap) as unfold gives them
            # (bias as the last row)
            self.w1 = (torch.cat((w1.reshape(m * self.c1, -1).t(), b1[None]), 0) * half).contiguous().to(self.device)
            # conv2/3: (M*O, C, K) -> grouped Conv2d weights (M*O, C, 1, K), channels-last
            self.kernels, self.kernel_bias = [], []
            for w, b, scale in ((w2, b2, half), (w3, b3, 1.0)):
                self.kernels.append((w * scale).unsqueeze(2).contiguous(memory_format=torch.channels_last).to(self.device))
                self.kernel_bias.append((b * scale).to(self.device))
            self.dense = [_FusedMember(mb).to_device(self.device) for mb in members]
        self.native = self._native_stage(native, compile)

    @staticmethod
    def covers(ensemble: DenseSME) -> bool:
        """Whether this engine computes the ensemble's architecture: the default spec only (its
        stages are written for three convolutions and poolings of 2, 2 and 4)."""
        return ensemble.arch.is_default

    def _native_stage(self, wanted: bool | None, compile: bool) -> native.ConvStage | None:
        if wanted is False or (wanted is None and (compile or self.device.type != "cpu")):
            return None
        fits = self.device.type == "cpu" and native.supports(
            self.n_series, self.length, (self.c1, *(k.shape[0] // self.n_members for k in self.kernels)), KERNEL,
            POOL_WINDOWS,
        )
        lib = native.conv_stage_library() if fits else None
        if lib is None:
            if wanted:
                raise MsdaError("the C convolution stage was asked for, but it needs a CPU device, the default "
                                "architecture and a C compiler (see msda/native.py)")
            return None
        return native.ConvStage(lib, self.w1, self.kernels, self.kernel_bias, self.n_members, self.n_series,
                                self.length, CONV_FILTERS[2] * pooled_length(self.length))

    def _conv_features(self, series: torch.Tensor) -> torch.Tensor:
        """Temporal features of every member: (batch, n_series, length) -> (batch, M, C3 * L3)."""
        b, m = series.shape[0], self.n_members
        # conv1, shared input: one GEMM for all members, then pool (the 1/2 is in the weights)
        windows = _replicate_pad(series.transpose(1, 2), 1).unfold(1, KERNEL, 1)  # (b, L, S, K)
        cols = series.new_ones(b * self.length, self.w1.shape[0])  # the last column multiplies the bias
        cols[:, :-1] = windows.reshape(b * self.length, -1)
        h = torch.mm(cols, self.w1).relu_()  # (addmm would first copy the bias into every row)
        h = _pair_sum(h.view(b, self.length, m * self.c1), 1)
        h = _pair_sum(_grouped_conv(h, self.kernels[0], self.kernel_bias[0], m), 1)  # conv2, pool
        h = _grouped_conv(h, self.kernels[1], self.kernel_bias[1], m)  # conv3: (b, L2, m*c3)
        w = POOL_WINDOWS[2]  # ceil-mode average pooling
        pooled = torch.stack([h[:, s : s + w].mean(1) for s in range(0, h.shape[1], w)], dim=2)  # (b, m*c3, L3)
        # channel-major per member, like Conv1d output flattening
        return pooled.reshape(b, m, -1)

    def _conv_chunk(self, series: torch.Tensor) -> torch.Tensor:
        n = series.shape[0]
        if self.compiled and n < self.conv_batch:  # one shape for the compiled graph
            series = torch.cat((series, series[-1:].expand(self.conv_batch - n, -1, -1)))
        return self._conv(series)[:n]

    @torch.inference_mode()
    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's prediction for normalised inputs x, shape (batch, n_members)."""
        if x.shape[0] == 0:
            return torch.empty(0, self.n_members, device=x.device, dtype=x.dtype)
        return self._dense_all(*self._shared_and_conv(x))

    @torch.inference_mode()
    def member_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's prediction (n_members, batch) and bottleneck features (n_members, batch, 32),
        the 32 values the domain losses compare (after the bottleneck's batch norm)."""
        shared, conv = self._shared_and_conv(x)
        outs = [member(torch.cat((shared, conv[:, j]), dim=1), features=True) for j, member in enumerate(self.dense)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def _shared_and_conv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scalars and series means (B, n_scalars + S) and every member's temporal features (B, M, 4 * L3)."""
        b = x.shape[0]
        scalars = x[:, : self.n_scalars]
        series = x[:, self.n_scalars :].reshape(b, self.n_series, self.length)
        if self.native is not None:
            conv = self.native(x, self.n_scalars)
        else:
            conv = torch.cat([self._conv_chunk(s) for s in series.split(self.conv_batch)])
        return torch.cat((scalars, series.mean(dim=2)), dim=1), conv

    def _dense_all(self, shared: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(torch.cat((shared, conv[:, j]), dim=1)) for j, member in enumerate(self.dense)], 1)


def inference_engine(ensemble: DenseSME, device: str | torch.device = "cpu", compile: bool = False):
    """The fastest inference engine that covers the ensemble's architecture: ``FusedEnsemble``
    for the default spec, else the reference modules (``msda.network.reference``)."""
    if FusedEnsemble.covers(ensemble):
        return FusedEnsemble(ensemble, device, compile=compile)
    from msda.network.reference import ReferenceEngine

    return ReferenceEngine(ensemble, device)


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
