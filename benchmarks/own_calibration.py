"""Conformal intervals on your own data: generated stations without series (the raw table of
tests/test_samples.py, 30 stations x 40 dates), 5 members (width 16, depths 1-5) trained on 12
stations, the scale calibrated on 9 others, coverage measured on the last 9.

    python benchmarks/own_calibration.py [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import msda
from msda.calibrate import conformal_scale, coverage, interval
from msda.network.model import DenseSME, MemberSpec
from msda.schema import load_schema
from msda.transfer import FitData, LossWeights, TrainSettings, fit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_samples import SCHEMA, raw_table  # noqa: E402

Z = {0.8: 1.2816, 0.9: 1.6449, 0.95: 1.96}  # normal quantiles: the interval from the spread alone


def one_draw(seed: int, schema) -> list[str]:
    raw = raw_table(n_stations=30, per_station=40, seed=seed)
    stations = sorted(raw["station"].unique())
    split = {"train": stations[:12], "cal": stations[12:21], "test": stations[21:]}
    s = {k: msda.build_samples(raw[raw["station"].isin(v)], schema, "fine", truth="sm") for k, v in split.items()}
    x = torch.tensor(s["train"].features())
    y = torch.tensor(s["train"].truth, dtype=torch.float32)
    members = [MemberSpec(d, 16) for d in (1, 2, 3, 4, 5)]
    res = fit(DenseSME(members, schema=schema, seed=seed), FitData(x, y), LossWeights.for_method("finetune"),
              TrainSettings(epochs=40, lr=3e-3, batch=32, average_last=5, seed=seed), progress=False)
    cal, test = (msda.predict(res.ensemble, s[k].features()) for k in ("cal", "test"))
    truth = s["test"].truth
    rmse = float(np.sqrt(np.mean((test.mean - truth) ** 2)))
    rows = []
    for level, z in Z.items():
        q = conformal_scale(s["cal"].truth, cal.mean, cal.std, level)
        lo, hi = interval(test.mean, test.std, {"scale": q})
        rows.append(f"| {seed} | {level:.2f} | {q:.2f} | {coverage(truth, lo, hi):.3f} | "
                    f"{coverage(truth, test.mean - z * test.std, test.mean + z * test.std):.3f} | {rmse:.4f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "own.toml"
        path.write_text(SCHEMA)
        schema = load_schema(path)
    print("| seed | level | conformal scale | coverage, 9 test stations | mean +- z x spread alone | test RMSE |")
    print("|---|---|---|---|---|---|")
    for seed in (int(v) for v in args.seeds.split(",")):
        print("\n".join(one_draw(seed, schema)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
