"""Side-by-side timing of this tree against a git revision, interleaved in one process.

This machine's speed moves by up to 2x within minutes (memory-bound code most), so a speed-up is
only trustworthy when the old and the new code run in turns in the same process. This loads
``src/msda/stacked.py`` and ``src/msda/predict.py`` as they are at ``--against`` (default HEAD)
next to the working tree's, and times in turns:

- ``step``: one training step of the 25-member stacked ensemble (3 streams of 128 samples,
  forward, a loss on outputs and features, backward, Adam), in ms;
- ``predict``: the fused predictor on 4096 random samples, in samples/s.

    python benchmarks/ab.py [--against REV] [--repeats 6] [--what step,predict]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from msda.model import DenseSME, default_members
from msda.runtime import tune_allocator
from msda.schema import DEFAULT_SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def _show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def module_at(rev: str, name: str, folder: Path):
    """``msda.<name>`` as it is at git revision ``rev``, imported under another name; its
    ``native`` (the C kernels, if it uses them) is also the one at ``rev``, with its C source."""
    path = folder / f"{name}_at_rev.py"
    path.write_text(_show(rev, f"src/msda/{name}.py"))
    if name == "native":
        (folder / "_convstage.c").write_text(_show(rev, "src/msda/_convstage.c"))
    spec = importlib.util.spec_from_file_location(f"{name}_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if name != "native" and hasattr(module, "native"):
        module.native = sys.modules.get("native_at_rev") or module_at(rev, "native", folder)
    return module


def step_fn(stacked_module, ensemble: DenseSME, x: torch.Tensor):
    stacked = stacked_module.StackedEnsemble.from_ensemble(ensemble).train()
    opt = torch.optim.Adam(stacked.parameters(), lr=5e-4, fused=True)  # as transfer.fit

    def step() -> None:
        y, f = stacked(x, internal_order=True)
        loss = (y**2).mean(1).sum() + f.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="git revision to compare with")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--what", default="step,predict")
    args = ap.parse_args()
    tune_allocator()  # as transfer.fit and msda map do
    torch.manual_seed(0)
    ensemble = DenseSME(default_members(), seed=0)
    what = args.what.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'old' = {args.against}, 'new' = working tree")
        if "step" in what:
            new_stacked = importlib.import_module("msda.stacked")

            x = torch.rand(384, DEFAULT_SCHEMA.n_features)
            fns = {"old": step_fn(module_at(args.against, "stacked", Path(tmp)), ensemble, x),
                   "new": step_fn(new_stacked, ensemble, x)}
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    for _ in range(2):
                        fn()
                    t = time.perf_counter()
                    for _ in range(10):
                        fn()
                    times[k].append((time.perf_counter() - t) / 10 * 1e3)
            for k, v in times.items():
                print(f"step    {k}: min {min(v):6.1f} ms, median {sorted(v)[len(v) // 2]:6.1f} ms  ({' '.join(f'{a:.0f}' for a in v)})")
            print(f"step    old / new: {min(times['old']) / min(times['new']):.2f}x (min), "
                  f"{sorted(times['old'])[len(v) // 2] / sorted(times['new'])[len(v) // 2]:.2f}x (median)")
        if "predict" in what:
            new_predict = importlib.import_module("msda.predict")  # (msda.predict is also a function)

            ensemble.eval()
            x = torch.rand(4096, DEFAULT_SCHEMA.n_features)
            engines = {"old": module_at(args.against, "predict", Path(tmp)).FusedEnsemble(ensemble),
                       "new": new_predict.FusedEnsemble(ensemble)}
            rates = {k: [] for k in engines}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for k, engine in engines.items():
                        engine.member_outputs(x)
                        t = time.perf_counter()
                        engine.member_outputs(x)
                        engine.member_outputs(x)
                        rates[k].append(2 * len(x) / (time.perf_counter() - t))
            for k, v in rates.items():
                print(f"predict {k}: best {max(v):8,.0f} samples/s, median {sorted(v)[len(v) // 2]:8,.0f}")
            print(f"predict new / old: {max(rates['new']) / max(rates['old']):.2f}x (best), "
                  f"{sorted(rates['new'])[len(v) // 2] / sorted(rates['old'])[len(v) // 2]:.2f}x (median)")


if __name__ == "__main__":
    sys.exit(main())
