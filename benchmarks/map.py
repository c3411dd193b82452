"""msda map throughput and memory: 25-member DenseSM-E over synthetic 50 m scenes on CPU.

Prints, in one run: the compute bound of this machine (SGEMM rate / multiply-adds per sample,
as benchmarks/predict.py counts them), the fused predictor on random inputs (no I/O), then
``msda map`` over a scene and over one 4 times larger, each in its own process: pixels per
second of the mapping tasks (reading windows, features, prediction, Zarr writes) as a fraction
of the bound, the whole command's time (COGs and previews too) and its peak resident memory;
each scene once with the convolution stage in C (the default on CPU) and once in PyTorch
(``MSDA_NATIVE=0``), for a side-by-side ratio.

    python benchmarks/map.py [--cells 1x2] [--dates 2] [--chunks 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from predict import ISSUE_BOUND, macs_per_sample, sgemm_gflops  # noqa: E402

from msda.network.model import DenseSME  # noqa: E402
from msda.weights import save_ensemble  # noqa: E402

CHILD = """
import json, resource, sys, time

def peak_mb():
    # VmHWM: this process's own peak (ru_maxrss would include the parent's pages at fork)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

mode = sys.argv[1]
if mode == "scene":
    from msda.simulate.scene import simulate_scene, write_scene
    rows, cols = (int(v) for v in sys.argv[3].split("x"))
    write_scene(simulate_scene(cells=(rows, cols), dates=int(sys.argv[4])), sys.argv[2])
    print(json.dumps({}))
elif mode == "predict":
    import torch
    sys.path.insert(0, sys.argv[3])
    from predict import rate
    from msda.predict import FusedEnsemble, predict
    from msda.weights import load_ensemble
    engine = FusedEnsemble(load_ensemble(sys.argv[2]).eval())
    print(json.dumps({"rate": rate(lambda b: predict(engine, b), torch.rand(4096, 153), 5.0)}))
else:
    from msda.mapping import make_map
    t0 = time.perf_counter()
    s = make_map(sys.argv[2], sys.argv[3], sys.argv[4], chunks=int(sys.argv[5]), progress=False)
    print(json.dumps({"pixels": s["pixels"], "map_s": s["seconds"], "total_s": time.perf_counter() - t0,
                      "peak_mb": peak_mb(), "stages": s["task_seconds"], "conv_stage": s["conv_stage"]}))
"""


def child(*args, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process (its memory and threads its own)."""
    res = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=False,
                         env=None if env is None else {**os.environ, **env})
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", default="1x2", help="the smaller scene, rows x cols of 9 km cells")
    ap.add_argument("--dates", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.cells.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msda-map-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    ensemble = DenseSME(seed=0).eval()
    weights = work / "weights25"
    if not weights.exists():
        save_ensemble(ensemble, weights)
    gflops = sgemm_gflops()
    bound = gflops * 1e9 / (2 * macs_per_sample(ensemble))
    raw = child("predict", weights, Path(__file__).parent)["rate"]
    print(f"threads {torch.get_num_threads()}, SGEMM {gflops:.0f} GFLOP/s -> compute bound {bound:,.0f} samples/s "
          f"(issue's figure {ISSUE_BOUND:,})")
    print(f"fused predictor on random inputs (no I/O): {raw:,.0f} samples/s = {raw / bound:.1%} of the measured bound")

    results = {}
    for name, shape in (("scene", (rows, cols)), ("4x scene", (2 * rows, 2 * cols))):
        path = work / f"scene_{shape[0]}x{shape[1]}_{args.dates}.zarr"
        if not path.exists():
            t0 = time.perf_counter()
            child("scene", path, f"{shape[0]}x{shape[1]}", args.dates)
            print(f"generated {path.name} in {time.perf_counter() - t0:.0f} s")
        for c_stage in (True, False):
            label = name + ("" if c_stage else ", PyTorch convs")
            r = child("map", weights, path, work / f"map_{len(results)}", args.chunks,
                      env=None if c_stage else {"MSDA_NATIVE": "0"})
            pps = r["pixels"] / r["map_s"]
            results[label] = r
            print(f"{label:>24}: {shape[0]}x{shape[1]} cells of 9 km, {args.dates} dates, {r['pixels']:,} pixel-dates: "
                  f"mapping {r['map_s']:.1f} s = {pps:,.0f} pixels/s = {pps / bound:.1%} of the measured bound, "
                  f"{pps / ISSUE_BOUND:.1%} of the issue's; whole command {r['total_s']:.1f} s; "
                  f"peak memory {r['peak_mb']:,.0f} MB; task seconds {r['stages']}; convolutions in {r['conv_stage']}")
    a, b = results["scene"], results["4x scene"]
    print(f"peak memory 4x scene / scene: {b['peak_mb'] / a['peak_mb']:.2f} (goal <= 1.20)")
    print(f"mapping rate / fused predictor rate (4x scene): {b['pixels'] / b['map_s'] / raw:.2f}")
    for name in ("scene", "4x scene"):
        c, t = results[name], results[name + ", PyTorch convs"]
        print(f"{name}: convolutions in C / in PyTorch: {t['map_s'] / c['map_s']:.2f}x")

if __name__ == "__main__":
    main()
