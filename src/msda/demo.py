"""The demo: the synthetic benchmark, a quick 9 km pretraining, an MSDA adaptation to SCAN,
weights in both formats and prediction, end to end.

The pretraining is short (``pretrain_epochs``) so that the demo ends in minutes on two cores;
``msda pretrain`` with its defaults trains longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msda.adapt import adapt, pretrain
from msda.predict import predict_table
from msda.simulate import SimConfig, simulate, write_benchmark
from msda.transfer import TrainSettings
from msda.weights import load_ensemble, save_authors


def run_demo(
    out: Path,
    scale: float = 1.0,
    seed: int = 0,
    echo: Callable[[str], None] = print,
    pretrain_epochs: int = 3,
    adapt_epochs: int = 20,
    stations: int = 5,
) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = simulate(SimConfig(scale=scale, seed=seed))
    write_benchmark(bench, out / "benchmark", plots=True)
    echo(
        f"benchmark: {len(bench.stations)} stations, {len(bench.fine)} fine (50 m), {len(bench.coarse)} coarse "
        f"(9 km), {len(bench.pretrain)} pretraining samples in {time.perf_counter() - t0:.1f} s -> {out / 'benchmark'}"
    )
    f = bench.fine.frame
    echo(f"  in-situ soil moisture by network (m3/m3): " + ", ".join(
        f"{k} {v:.3f}" for k, v in f.groupby("network")["sm_m3m3"].mean().items()))
    echo(f"  figures: {', '.join(sorted(p.name for p in (out / 'benchmark').glob('*.png')))}")

    t0 = time.perf_counter()
    settings = TrainSettings(epochs=pretrain_epochs, batch=256, average_last=1, seed=seed)
    res = pretrain(bench.pretrain, out / "weights_9km", settings)
    last = [r["fine_50m"] for r in res.losses if r["epoch"] == pretrain_epochs]
    echo(
        f"pretrain: 25 members, {pretrain_epochs} epochs on {len(bench.pretrain)} 9 km samples in "
        f"{time.perf_counter() - t0:.0f} s ({res.device}); training RMSE {np.sqrt(np.mean(last)):.3f} m3/m3 "
        f"-> {out / 'weights_9km'}"
    )

    authors_dir = out / "weights_authors"
    save_authors(res.ensemble, authors_dir)
    authors = load_ensemble(authors_dir)
    ours = load_ensemble(out / "weights_9km")
    x = torch.tensor(bench.fine.features()[:2048])
    with torch.inference_mode():
        same = torch.equal(authors.member_outputs(x), ours.member_outputs(x))
    echo(f"weights: the 25 members also as the authors' .pt files ({authors_dir}); identical outputs: {same}")

    t0 = time.perf_counter()
    fit, metrics = adapt(ours, bench.fine, bench.coarse, "SCAN", stations, "msda", out / "msda_scan",
                         TrainSettings(epochs=adapt_epochs, seed=seed))
    echo(f"adapt: MSDA on SCAN with {stations} stations, {adapt_epochs} epochs in {time.perf_counter() - t0:.0f} s; "
         f"target stations (transductive):")
    echo("  " + metrics.to_string(index=False, float_format=lambda v: f"{v:.3f}").replace("\n", "\n  "))

    t0 = time.perf_counter()
    adapted = load_ensemble(out / "msda_scan" / "weights")
    n = predict_table(adapted, out / "benchmark" / "fine.parquet", out / "predictions.parquet")
    dt = time.perf_counter() - t0
    pred = pd.read_parquet(out / "predictions.parquet", columns=["sm_pred", "sm_std"])
    echo(
        f"predict (inductive, every network): {n} fine samples in {dt:.1f} s ({n / dt:,.0f} samples/s, "
        f"{torch.get_num_threads()} threads); mean member spread {pred['sm_std'].mean():.3f} m3/m3"
    )
    echo(f"outputs in {out}/")
