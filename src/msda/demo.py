"""The demo: the synthetic benchmark, weights in both formats, and prediction, end to end.

Training lands with the transfer issue; until then the ensemble is untrained (seeded), so the
predictions show the machinery and its speed, not a retrieval skill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from msda.model import DenseSME
from msda.predict import predict_table
from msda.schema import DEFAULT_SCHEMA
from msda.simulate import SimConfig, simulate, write_benchmark
from msda.weights import load_ensemble, provenance, save_authors, save_ensemble


def run_demo(out: Path, scale: float = 1.0, seed: int = 0, echo: Callable[[str], None] = print) -> None:
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

    ensemble = DenseSME(schema=DEFAULT_SCHEMA, seed=seed).eval()
    save_authors(ensemble, out / "weights_authors")
    authors = load_ensemble(out / "weights_authors")
    save_ensemble(authors, out / "weights", provenance(kind="untrained initialisation", seed=seed))
    ours = load_ensemble(out / "weights")
    x = torch.tensor(bench.fine.features()[:2048])
    with torch.inference_mode():
        same = torch.equal(authors.member_outputs(x), ours.member_outputs(x))
    echo(f"weights: 25 members as the authors' .pt files and as safetensors; identical outputs: {same}")

    t0 = time.perf_counter()
    n = predict_table(ours, out / "benchmark" / "fine.parquet", out / "predictions.parquet")
    dt = time.perf_counter() - t0
    pred = pd.read_parquet(out / "predictions.parquet", columns=["sm_pred", "sm_std"])
    echo(
        f"predict: {n} fine samples in {dt:.1f} s ({n / dt:,.0f} samples/s, {torch.get_num_threads()} threads); "
        f"mean member spread {pred['sm_std'].mean():.3f} (untrained weights: no retrieval skill yet)"
    )
    echo(f"outputs in {out}/")
