"""The gap the method must close: a model trained only at 9 km against models trained at 50 m.

On one network (default SCAN), the stations are split in two halves (seeded). Three DenseSM-E
ensembles of the same members are scored on the 50 m samples of the held-out half:

- **9 km only**: the given weights, pretrained on the 9 km table (SMAP truth) and nothing else;
- **50 m only**: the same members trained from scratch on the 50 m samples of the other half;
- **9 km then 50 m**: the 9 km weights finetuned on that half (MSE on in situ only).

If the first is no worse than the others, the benchmark has no 9 km -> 50 m mismatch and no
transfer method can show anything on it. Prints the three scores and writes a figure (per-station
RMSE and measured against predicted).

    python benchmarks/scale_gap.py --fine bench/fine.parquet --weights w9km/ [--network SCAN]
        [--epochs 20] [--seed 0] [--figure scale_gap.png]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msda.adapt import pretrain
from msda.metrics import scores
from msda.predict import predict
from msda.tables import TRUTH, read_samples
from msda.transfer import LossWeights, TrainSettings, fit, FitData
from msda.weights import load_ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fine", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--network", default="SCAN")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", default="scale_gap.png")
    args = ap.parse_args()

    fine = read_samples(args.fine).select_networks([args.network])
    stations = np.array(sorted(fine.frame["station"].astype(str).unique()))
    rng = np.random.default_rng(args.seed)
    train_st = set(rng.choice(stations, len(stations) // 2, replace=False))
    is_train = fine.frame["station"].astype(str).isin(train_st).to_numpy()
    train = replace(fine, frame=fine.frame[is_train].reset_index(drop=True))
    test = fine.frame[~is_train].reset_index(drop=True)
    x_test = test[fine.schema.feature_names].to_numpy(np.float32)
    print(f"{args.network}: {len(train_st)} training stations ({is_train.sum()} samples), "
          f"{len(stations) - len(train_st)} held out ({len(test)} samples)")

    pretrained = load_ensemble(args.weights, schema=fine.schema)
    settings = TrainSettings(epochs=args.epochs, seed=args.seed, average_last=min(10, args.epochs))
    preds = {"9 km only": predict(pretrained, x_test).mean}
    with tempfile.TemporaryDirectory() as tmp:
        res = pretrain(train, Path(tmp) / "w", settings, members=list(pretrained.specs), progress=True)
        preds["50 m only"] = predict(res.ensemble, x_test).mean
    tuned = load_ensemble(args.weights, schema=fine.schema)
    data = FitData(torch.from_numpy(np.array(train.features())), torch.from_numpy(train.truth.copy()))
    res = fit(tuned, data, LossWeights(alpha=1.0, beta=0.0), settings, True, description="finetune")
    preds["9 km then 50 m"] = predict(res.ensemble, x_test).mean

    truth = test[TRUTH].to_numpy()
    rows = []
    for name, p in preds.items():
        s = scores(truth, p)
        per = pd.DataFrame({"st": test["station"].astype(str), "t": truth, "p": p}).groupby("st").apply(
            lambda g: float(np.sqrt(np.mean((g.t - g.p) ** 2))), include_groups=False)
        rows.append({"model": name, **{k: s[k] for k in ("rmse", "ubrmse", "bias", "r")},
                     "median_station_rmse": float(per.median()), "stations_rmse_over_0.1": int((per > 0.1).sum())})
        preds[name] = (p, per)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    base = table.set_index("model")["rmse"]
    print(f"ratio 9 km only / 50 m only: {base['9 km only'] / base['50 m only']:.2f}; "
          f"9 km only / 9 km then 50 m: {base['9 km only'] / base['9 km then 50 m']:.2f}")
    draw(preds, truth, table, args)


def draw(preds, truth, table, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    names = list(preds)
    axes[0].boxplot([preds[n][1].to_numpy() for n in names], tick_labels=names)
    axes[0].set_ylabel("RMSE per held-out station (m3/m3)")
    axes[0].set_ylim(bottom=0)
    axes[0].tick_params(axis="x", labelsize=8)
    for ax, n in zip(axes[1:], names):
        hb = ax.hexbin(truth, preds[n][0], gridsize=40, extent=(0, 0.6, 0, 0.6), mincnt=1, cmap="viridis")
        fig.colorbar(hb, ax=ax, label="samples")
        ax.plot([0, 0.6], [0, 0.6], "k--", lw=0.8)
        r = table.set_index("model").loc[n]
        ax.set_title(f"{n}: RMSE {r['rmse']:.3f}, R {r['r']:.2f}", fontsize=9)
        ax.set_xlabel("in situ (m3/m3)")
        ax.set_ylabel("predicted (m3/m3)")
    fig.suptitle(f"{args.network}, held-out half of the stations: trained at 9 km only against trained at 50 m")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
