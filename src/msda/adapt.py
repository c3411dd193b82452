"""``msda pretrain`` and ``msda adapt``: run a fit and write its output directory atomically.

An adaptation directory holds:

- ``weights/``: the adapted DenseSM-E (safetensors + manifest; ``msda predict --weights`` reads it)
- ``stations.csv``: the training stations and their sample counts
- ``losses.csv``: per member and epoch, the joint, 50 m, 9 km and domain losses
- ``metrics.csv``: bias, R, RMSE, ubRMSE on the target stations, pretrained and adapted
- ``target_predictions.parquet``: every target sample with truth, pretrained and adapted values
- ``run.json``: settings, beta per member, timings and versions
- ``losses.png``, ``target_scatter.png``: the loss curves and measured against predicted
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msda.io import atomic_path, check_output
from msda.metrics import scores
from msda.network.model import DenseSME, MemberSpec, default_members
from msda.network.spec import DEFAULT_ARCH, ArchSpec
from msda.predict import predict
from msda.tables import TRUTH, Samples
from msda.transfer import (
    FitData,
    FitResult,
    LossWeights,
    TrainSettings,
    TransferError,
    adapt_problem,
    fit,
    settings_dict,
)
from msda.provenance import provenance
from msda.weights import save_ensemble


def pretrain(
    coarse: Samples,
    out: str | Path,
    settings: TrainSettings,
    members: list[MemberSpec] | None = None,
    progress: bool = True,
    force: bool = False,
    arch: ArchSpec = DEFAULT_ARCH,
) -> FitResult:
    """Train a DenseSM-E of architecture ``arch`` from scratch on a sample table (MSE on its truth:
    9 km samples with SMAP, or 50 m samples with in situ when there is no 9 km data); write the
    weights to ``out``."""
    check_output(out, "weights", (coarse.source,), force)
    if len(coarse) < 2:
        raise TransferError(f"{coarse.source}: need at least 2 samples to pretrain, got {len(coarse)}")
    specs = members if members is not None else default_members()
    ensemble = DenseSME(specs, schema=coarse.schema, seed=settings.seed, arch=arch)
    x = torch.from_numpy(np.array(coarse.features()))
    y = torch.from_numpy(coarse.truth.copy())
    result = fit(ensemble, FitData(x, y), LossWeights(alpha=1.0, beta=0.0), settings, progress, description="pretrain")
    info = provenance(
        task="pretrain",
        samples=coarse.source,
        n_samples=len(coarse),
        seconds=round(result.seconds, 2),
        ran_on=result.device,
        parts_used=result.parts,
        **settings_dict(LossWeights(alpha=1.0, beta=0.0), settings),
    )
    out = Path(out)
    with atomic_path(out, "weights", inputs=(coarse.source,), force=force) as tmp:
        save_ensemble(result.ensemble, tmp, info)
        pd.DataFrame(result.losses).to_csv(tmp / "losses.csv", index=False)
    return result


def _metrics_table(target: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    rows = [{"model": name, **scores(target[TRUTH].to_numpy(), target[col].to_numpy())} for name, col in columns.items()]
    return pd.DataFrame(rows)


def adapt(
    ensemble: DenseSME,
    fine: Samples,
    coarse: Samples | None,
    network: str,
    stations: int | list[str],
    method: str,
    out: str | Path,
    settings: TrainSettings,
    alpha: float | None = None,
    beta: float | str | None = None,
    domain_loss: str = "coral",
    progress: bool = True,
    figures: bool = True,
    monitor_every: int = 0,
    force: bool = False,
) -> tuple[FitResult, pd.DataFrame]:
    """Adapt ``ensemble`` to ``network`` with ``method``; write the output directory ``out``.

    Returns the fit and the target metrics (pretrained and adapted ensemble mean).
    ``monitor_every`` > 0 adds the target RMSE every that many epochs to ``losses.csv``.
    """
    weights = LossWeights.for_method(method, alpha, beta, domain_loss)
    settings.check()
    if coarse is None and weights.uses_9km:
        raise TransferError(f"method {method} learns from 9 km samples too: give the 9 km table (--coarse)")
    sources = (fine.source, None if coarse is None else coarse.source, getattr(ensemble, "source", None))
    check_output(out, "adaptation", sources, force)
    problem = _adapt_problem(ensemble, fine, coarse, network, stations, weights, settings.seed)
    data = problem.fit_data()
    monitor = (data.x_target, torch.from_numpy(problem.target[TRUTH].to_numpy(np.float32, copy=True)))
    result = fit(ensemble, data, weights, settings, progress, description=method,
                 monitor=monitor if monitor_every else None, monitor_every=monitor_every)
    target = _target_predictions(ensemble, result, problem, fine)
    metrics = _metrics_table(target, {"pretrained": "pretrained", method: "adapted"})
    run = {
        "task": "adapt",
        "method": method,
        "network": network,
        "fine": fine.source,
        "coarse": None if coarse is None else coarse.source,
        "train_stations": problem.train_stations,
        "counts": {"labeled": len(problem.labeled), "target": len(problem.target), "coarse_9km": len(problem.coarse)},
        "beta_per_member": dict(zip(ensemble.names, result.beta)),
        "seconds": round(result.seconds, 2),
        "steps": result.steps,
        "ran_on": result.device,
        "parts_used": result.parts,
        "weights_in": getattr(ensemble, "provenance", {}),
        **settings_dict(weights, settings),
    }
    _write_adaptation(Path(out), sources, force, result, problem, network, method, metrics, target, run, figures)
    return result, metrics


def _adapt_problem(ensemble: DenseSME, fine: Samples, coarse: Samples | None, network: str, stations,
                   weights: LossWeights, seed: int):
    """The station draw and the three sample sets, or one TransferError naming what is missing."""
    if not ensemble.schema.same_layout(fine.schema):
        raise TransferError(
            f"the weights use schema {ensemble.schema.name!r} ({ensemble.schema.n_features} features) but "
            f"{fine.source} uses {fine.schema.name!r} ({fine.schema.n_features} features)"
        )
    problem = adapt_problem(fine, coarse, network, stations, seed=seed)
    if problem.labeled.empty:
        raise TransferError(f"no labeled samples for stations {problem.train_stations} in {fine.source}")
    if problem.target.empty:
        raise TransferError(f"network {network}: no target samples left in {fine.source}")
    if weights.uses_9km and problem.coarse.empty:
        raise TransferError(f"{coarse.source}: no 9 km samples in the cells of network {network}'s stations")  # type: ignore[union-attr]
    return problem


def _target_predictions(ensemble: DenseSME, result: FitResult, problem, fine: Samples) -> pd.DataFrame:
    """The target samples with the pretrained and the adapted ensemble mean (and spread)."""
    x_target = problem.target[fine.schema.feature_names].to_numpy(np.float32)
    before = predict(ensemble, x_target, device=result.device)
    after = predict(result.ensemble, x_target, device=result.device)
    ids = [c for c in ("network", "station", "r", "c", "date") if c in problem.target]
    target = problem.target[ids + [TRUTH]].reset_index(drop=True)
    target["pretrained"] = before.mean
    target["adapted"] = after.mean
    target["adapted_std"] = after.std
    return target


def _write_adaptation(out: Path, sources, force: bool, result: FitResult, problem, network: str, method: str,
                      metrics: pd.DataFrame, target: pd.DataFrame, run: dict, figures: bool) -> None:
    """The output directory, whole or not at all: weights, stations, losses, metrics, target
    predictions, run.json and figures."""
    info = provenance(**{k: v for k, v in run.items() if k != "weights_in"})
    with atomic_path(out, "adaptation", inputs=sources, force=force) as tmp:
        tmp.mkdir()
        save_ensemble(result.ensemble, tmp / "weights", info)
        counts = problem.labeled.groupby(problem.labeled["station"].astype(str)).size()
        pd.DataFrame({"network": network, "station": counts.index, "samples": counts.to_numpy()}).to_csv(
            tmp / "stations.csv", index=False
        )
        pd.DataFrame(result.losses).to_csv(tmp / "losses.csv", index=False)
        metrics.to_csv(tmp / "metrics.csv", index=False)
        target.to_parquet(tmp / "target_predictions.parquet", index=False)
        (tmp / "run.json").write_text(json.dumps({**provenance(), **run}, indent=2, default=str))
        if figures:
            from msda.figures import loss_curves, target_scatter

            loss_curves(pd.DataFrame(result.losses), tmp / "losses.png", title=f"{method} on {network}")
            target_scatter(target, tmp / "target_scatter.png", method)


def read_station_list(path: str | Path) -> list[str]:
    """Station names from a text file (one per line) or a CSV with a ``station`` column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TransferError(f"{path}: cannot read the station list ({exc.strerror})") from None
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path)
        if "station" not in frame:
            raise TransferError(f"{path}: no 'station' column")
        names = frame["station"].dropna().astype(str).str.strip().tolist()
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise TransferError(f"{path}: the station list is empty")
    return names
