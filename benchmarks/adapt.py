"""One MSDA ensemble fit: msda against the authors' ft_ensemble.py, same data and settings, one run.

The data: the generated CONUS benchmark, network SCAN, N training stations (default 45, about
8,000 labeled samples), the other SCAN stations as target (about 25,000 samples) and the 9 km
samples of the SCAN cells. Both sides start from the same 25 members, pretrained here for
``--pretrain-epochs`` on the generated 9 km pretraining table (not timed; untrained members give
Eq. 4 betas of 1e6-1e9 and the fits diverge), written as the authors' .pt files, and use alpha
0.7, beta auto (Eq. 4), CORAL, MSE, Adam 5e-4, batch 128 per stream and weight averaging over the
last 10 epochs. Both adapted ensembles are then scored on the target stations.

The reference (``--reference DIR``, a checkout of rszlj/Transfer-DenseSM-E, e.g. from the
search tool's fetch) runs unmodified in a subprocess with ``--reference-python`` (it needs
scipy, scikit-learn, matplotlib and datashader): its own loaders (``utils.py``) and
``FinetuneModel.ft_ensemble`` with ``ex='ft13'`` (the three-stream loss), fed with our split.

    python benchmarks/adapt.py [--epochs 50] [--stations 45] [--members 25]
        [--parts K] [--reference /tmp/ref --reference-python /tmp/refvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from msda.adapt import pretrain
from msda.metrics import scores
from msda.network.model import default_members
from msda.predict import predict
from msda.simulate import SimConfig, simulate
from msda.tables import TRUTH, to_authors
from msda.transfer import LossWeights, TrainSettings, adapt_problem, fit
from msda.weights import load_ensemble, save_authors

REFERENCE_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, pandas as pd, torch
    cfg = json.loads(sys.argv[1])
    sys.path.insert(0, cfg["reference"])
    import utils, ft_ensemble  # the authors' modules, as they are
    torch.manual_seed(cfg["seed"])
    fine = pd.read_csv(cfg["fine"], index_col="s_index")
    coarse = pd.read_csv(cfg["coarse"])
    train_index = fine.index[fine["station"].isin(cfg["train"])]
    target_index = fine.index[fine["network"].eq(cfg["network"]) & ~fine["station"].isin(cfg["train"])]
    sl, val_data, tl, train_data, cl = utils.prepare_train_val_data_multiscale(
        fine, [train_index, target_index], coarse, 128, 1)
    setup = {"lr": 5e-4, "epoch_Num": cfg["epochs"], "swa_start": max(cfg["epochs"] - 10, 0),
             "alpha": 0.7, "beta": "auto", "domain_type": "coral", "mv_type": "MSE",
             "ex": "ft13_models", "batchS": 128, "br": 1}
    model = ft_ensemble.Build_DenseSM(cfg["weights"])
    model.rebuild_DenseSME()
    ft = ft_ensemble.FinetuneModel(setup, {"sl": sl, "tl": tl, "cl": cl, "val_data": val_data,
                                           "train_data": train_data})
    t = time.perf_counter()
    ft.ft_ensemble(model, cfg["out"])
    print(json.dumps({"seconds": time.perf_counter() - t}))
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--stations", type=int, default=45)
    ap.add_argument("--members", type=int, default=25, help="first k of the 25 members")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--parts", type=int, default=0, help="members in this many parts side by side (0: msda's default)")
    ap.add_argument("--reference", default=None, help="checkout of rszlj/Transfer-DenseSM-E")
    ap.add_argument("--reference-python", default=sys.executable)
    args = ap.parse_args()

    t = time.perf_counter()
    bench = simulate(SimConfig(seed=args.seed, networks=("SCAN",)))
    problem = adapt_problem(bench.fine, bench.coarse, "SCAN", args.stations, seed=args.seed)
    print(
        f"data: SCAN, {args.stations} training stations, {len(problem.labeled)} labeled, "
        f"{len(problem.target)} target, {len(problem.coarse)} 9 km samples "
        f"({-(-len(problem.labeled) // 128)} batches/epoch); generated in {time.perf_counter() - t:.1f} s"
    )
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = pretrain(bench.pretrain, Path(tmp) / "w", TrainSettings(epochs=args.pretrain_epochs, batch=256,
                            average_last=1, seed=args.seed, device=args.device),
                            members=default_members()[: args.members], progress=False).ensemble
    print(f"pretrained {args.members} members for {args.pretrain_epochs} epochs on {len(bench.pretrain)} 9 km "
          f"samples in {time.perf_counter() - t:.0f} s (not part of the comparison)")
    x_target = problem.target[bench.fine.schema.feature_names].to_numpy(np.float32)
    y_target = problem.target[TRUTH].to_numpy()

    def rmse(ens) -> str:
        s = scores(y_target, predict(ens, x_target).mean)
        return f"target RMSE {s['rmse']:.4f}, R {s['r']:.3f}"

    print(f"pretrained ensemble: {rmse(ensemble)}")
    threads = torch.get_num_threads()
    print(f"{args.members} members, {args.epochs} epochs, torch {torch.__version__}, {threads} threads")

    weights = LossWeights.for_method("msda")
    settings = TrainSettings(epochs=args.epochs, seed=args.seed, device=args.device, compile=args.compile,
                             parts=args.parts)
    res = fit(ensemble, problem.fit_data(), weights, settings, progress=False)
    ours = res.seconds
    print(f"msda:      {ours:8.1f} s  ({ours / args.epochs:.2f} s/epoch, {1000 * ours / res.steps:.0f} ms/step "
          f"for all members, device {res.device}); {rmse(res.ensemble)}")

    if args.reference:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            to_authors(bench.fine).to_csv(tmp / "input_fine.csv")
            coarse = to_authors(bench.coarse)
            coarse["gt"] = coarse["SMAP"]  # the reference's loader reads 'gt' from both tables
            coarse.loc[problem.coarse.index].to_csv(tmp / "input_9km.csv", index=False)
            save_authors(ensemble, tmp / "weights")
            (tmp / "out").mkdir()
            cfg = {
                "reference": str(Path(args.reference).resolve()),
                "fine": str(tmp / "input_fine.csv"),
                "coarse": str(tmp / "input_9km.csv"),
                "weights": "weights",  # relative: their file-name parser splits the path on '_'

                "out": str(tmp / "out"),
                "train": problem.train_stations,
                "network": "SCAN",
                "epochs": args.epochs,
                "seed": args.seed,
            }
            proc = subprocess.run(
                [args.reference_python, "-c", REFERENCE_DRIVER, json.dumps(cfg)],
                capture_output=True,
                text=True,
                cwd=tmp,
            )
            if proc.returncode:
                sys.exit(f"reference failed:\n{proc.stderr[-3000:]}")
            ref = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            adapted = load_ensemble(tmp / "out")  # their averaged members, as they saved them
            print(f"reference: {ref:8.1f} s  ({ref / args.epochs:.2f} s/epoch); {rmse(adapted)}")
        print(f"speed-up:  {ref / ours:.1f}x (goal >= 10x)")
    beta = np.asarray(res.beta)
    print(f"beta (Eq. 4) per member: min {beta.min():.3g}, median {np.median(beta):.3g}, max {beta.max():.3g}")


if __name__ == "__main__":
    main()
