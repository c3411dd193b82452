"""The demo: the synthetic benchmark, a quick 9 km pretraining, the weights in the authors'
format, the paper's experiment in its quick form (``Protocol.quick_run``) with its report, and
a 50 m map of a synthetic scene with the pretrained weights.

Everything is cut (members, epochs, N values, repeats) so that the demo ends in minutes on two
cores; ``msda pretrain`` and ``msda experiment`` with their defaults run the paper's settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from msda.adapt import pretrain
from msda.experiment import QUICK_MEMBERS, Inputs, Protocol, run_experiment
from msda.network.model import MemberSpec
from msda.errors import MsdaError
from msda.simulate import NETWORKS, SimConfig, simulate, write_benchmark
from msda.transfer import TrainSettings
from msda.weights import load_ensemble, save_authors


def run_demo(
    out: Path,
    scale: float = 1.0,
    seed: int = 0,
    echo: Callable[[str], None] = print,
    pretrain_epochs: int = 2,
    scheduler: str | None = None,
) -> None:
    out = Path(out)
    SimConfig(scale=scale, seed=seed).check()
    ns = Protocol.quick_run().ns
    n_scan = max(1, int(round(NETWORKS["SCAN"].stations * scale)))
    if max(ns) >= n_scan:  # checked before any work: the quick experiment needs a target station left
        least = math.ceil((max(ns) + 0.5) / NETWORKS["SCAN"].stations * 100) / 100
        raise MsdaError(f"--scale {scale:g} gives SCAN {n_scan} stations, and the quick experiment trains on up to "
                        f"{max(ns)} (N in {', '.join(map(str, ns))}) with one left to test: use --scale {least:.2f} or more")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = simulate(SimConfig(scale=scale, seed=seed))
    write_benchmark(bench, out / "benchmark", plots=True)
    echo(
        f"benchmark: {len(bench.stations)} stations, {len(bench.fine)} fine (50 m), {len(bench.coarse)} coarse "
        f"(9 km), {len(bench.pretrain)} pretraining samples in {time.perf_counter() - t0:.1f} s -> {out / 'benchmark'}"
    )
    echo(f"  figures: {', '.join(sorted(p.name for p in (out / 'benchmark').glob('*.png')))}")

    t0 = time.perf_counter()
    members = [MemberSpec(int(n.split("_")[1]), int(n.split("_")[2])) for n in QUICK_MEMBERS]
    settings = TrainSettings(epochs=pretrain_epochs, average_last=1, seed=seed)
    res = pretrain(bench.pretrain, out / "weights_9km", settings, members)
    last = [r["fine_50m"] for r in res.losses if r["epoch"] == pretrain_epochs]
    echo(
        f"pretrain: {len(members)} members, {pretrain_epochs} epochs on {len(bench.pretrain)} 9 km samples in "
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
    echo(f"weights: also as the authors' .pt files ({authors_dir}); identical outputs: {same}")

    t0 = time.perf_counter()
    bench_dir = out / "benchmark"
    inputs = Inputs(str(bench_dir / "fine.parquet"), str(bench_dir / "coarse.parquet"), str(out / "weights_9km"))
    protocol = Protocol.quick_run(seed=seed)
    tables = run_experiment(inputs, out / "experiment", protocol, scheduler=scheduler)
    wide = tables["median"].pivot_table(index="variant", columns="n", values="rmse")
    echo(f"experiment (quick): {len(protocol.tasks())} fits in {time.perf_counter() - t0:.0f} s; "
         "median-run RMSE on the SCAN target stations (m3/m3) by N:")
    echo("  " + wide.to_string(float_format=lambda v: f"{v:.4f}").replace("\n", "\n  "))
    echo(f"report: {out / 'experiment' / 'report.html'}")

    from msda.mapping import make_map

    summary = make_map(out / "weights_9km", "demo", out / "map")
    echo(f"map: a synthetic scene of {summary['shape'][1]} x {summary['shape'][2]} pixels of 50 m, "
         f"{summary['shape'][0]} dates, {summary['pixels_per_s']:,.0f} pixels/s -> {out / 'map'}")
    for d in summary["versus_truth"]:
        echo(f"  {d['date']}: RMSE {d['rmse']:.3f} m3/m3, R {d['r']:.2f} against the scene's true soil moisture")
