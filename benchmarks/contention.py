"""Thread settings on a busy machine: predict and a short adapt, idle and beside CPU-bound work.

Each run is a fresh process (OpenMP reads its settings when PyTorch loads it), started as the
command line starts (``msda.configure_threads``), in turns:

- ``default``: no setting: msda's threads (the available cores) and passive waiting;
- ``1 thread``: ``OMP_NUM_THREADS=1``;
- ``before``: the cores and OpenMP's default wait (``GOMP_SPINCOUNT=300000``, libgomp's own, which
  msda leaves alone): PyTorch's defaults, what msda ran with before it set them.

Workloads: ``predict``, the 25-member fused predictor on 20,000 samples (samples/s); ``adapt``, an
MSDA fit of the 25 members, 2 epochs of 512 labeled samples with target and 9 km streams (s).
Conditions: ``idle``, and ``busy``: two CPU-bound processes (busy loops) beside it.

    python benchmarks/contention.py [--repeats 2] [--busy 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "before": {"MSDA_THREADS": "{cores}", "GOMP_SPINCOUNT": "300000"},
}


def worker(kind: str) -> None:
    import msda  # sets OMP_WAIT_POLICY before PyTorch loads OpenMP
    import torch

    threads = msda.configure_threads()
    from msda.network.model import DenseSME, default_members

    g = torch.Generator().manual_seed(0)
    ensemble = DenseSME(default_members(), seed=0)
    t0 = time.perf_counter()
    if kind == "predict":
        x = torch.rand(20_000, 153, generator=g)
        msda.predict(ensemble, x.numpy())
        seconds = time.perf_counter() - t0
        result = {"rate": 20_000 / seconds}
    else:
        from msda.transfer import FitData, LossWeights, TrainSettings, fit

        x, xt, xc = (torch.rand(n, 153, generator=g) for n in (512, 2048, 2048))
        data = FitData(x, torch.rand(512, generator=g) * 0.4, x_target=xt, x_coarse=xc,
                       y_coarse=torch.rand(2048, generator=g) * 0.4)
        fit(ensemble, data, LossWeights.for_method("msda"), TrainSettings(epochs=2, batch=128, average_last=1),
            progress=False)
        result = {"seconds": time.perf_counter() - t0}
    print(json.dumps({**result, "threads": threads, "policy": os.environ.get("OMP_WAIT_POLICY")}))


def run(kind: str, setting: str, cores: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MSDA_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({k: v.format(cores=cores) for k, v in SETTINGS[setting].items()})
    out = subprocess.run([sys.executable, __file__, "--worker", kind], env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise SystemExit(f"{kind} / {setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("predict", "adapt"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes in the busy condition")
    ap.add_argument("--what", default="predict,adapt")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    from msda.runtime import available_cores

    cores = available_cores()
    print(f"{cores} cores; busy: {args.busy} busy-loop processes; {args.repeats} repeats, best kept")
    results: dict = {}
    for rep in range(args.repeats):
        for condition in ("idle", "busy"):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)] \
                if condition == "busy" else []
            try:
                time.sleep(1.0 if hogs else 0.0)
                for kind in args.what.split(","):
                    for setting in SETTINGS:
                        r = run(kind, setting, cores)
                        results.setdefault((kind, condition, setting), []).append(r)
                        value = f"{r['rate']:,.0f} samples/s" if "rate" in r else f"{r['seconds']:.1f} s"
                        print(f"  run {rep + 1}: {kind:7s} {condition:4s} {setting:9s} {value} ({r['threads']} threads)",
                              flush=True)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    print("\nbest of the repeats, and the default against the best fixed setting (higher is better):")
    for kind in args.what.split(","):
        for condition in ("idle", "busy"):
            speed = {}
            for setting in SETTINGS:
                rs = results[(kind, condition, setting)]
                speed[setting] = max(r["rate"] for r in rs) if kind == "predict" else max(1 / r["seconds"] for r in rs)
            unit = (lambda v: f"{v:,.0f} samples/s") if kind == "predict" else (lambda v: f"{1 / v:.1f} s")
            best_fixed = max(v for k, v in speed.items() if k != "default")
            cells = ", ".join(f"{k} {unit(v)}" for k, v in speed.items())
            print(f"{kind:7s} {condition:4s}: {cells}; default / best fixed {speed['default'] / best_fixed:.2f}x, "
                  f"default / before {speed['default'] / speed['before']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
