"""Side-by-side timing of this tree against a git revision, interleaved in one process.

This machine's speed moves by up to 2x within minutes (memory-bound code most), so a speed-up is
only trustworthy when the old and the new code run in turns in the same process. This loads the
package as it is at ``--against`` (default HEAD) next to the working tree's, and times in turns:

Each side runs as its dispatcher would: the working tree's C kernels only where it measured them
faster than PyTorch on this CPU (``prefer_native``); older revisions used them on every CPU.

- ``step``: one training step of the 25-member stacked ensemble (3 streams of 128 samples,
  forward, a loss on outputs and features, backward, Adam), in ms;
- ``predict``: the fused predictor on 4096 random samples, in samples/s.

    python benchmarks/ab.py [--against REV] [--repeats 6] [--what step,predict]
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from msda.network.model import DenseSME, default_members
from msda.runtime import tune_allocator
from msda.schema import DEFAULT_SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def package_at(rev: str, folder: Path):
    """The ``msda`` package as it is at git revision ``rev``, importable next to the working tree's
    as ``msda_at_rev`` (its own imports renamed), C source included."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/msda"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    root = folder / "msda_at_rev"
    (folder / "src" / "msda").rename(root)
    for path in root.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"^(\s*)from msda(\.| import)", r"\1from msda_at_rev\2", text, flags=re.M)
        text = re.sub(r"^(\s*)import msda\.", r"\1import msda_at_rev.", text, flags=re.M)
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("msda_at_rev")


def engine_module(package: str, kind: str):
    """The module holding the stacked trainer (``kind`` "stacked") or the fused predictor ("fused")
    in ``package``, wherever that revision keeps it."""
    for name in ((f"{package}.network.stacked", f"{package}.stacked") if kind == "stacked"
                 else (f"{package}.network.fused", f"{package}.predict")):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"no {kind} engine in {package}")


def step_fn(stacked_module, ensemble: DenseSME, x: torch.Tensor, native: bool | None = None):
    stacked = stacked_module.StackedEnsemble.from_ensemble(ensemble).train()
    stacked.native = native
    opt = torch.optim.Adam(stacked.parameters(), lr=5e-4, fused=True)  # as transfer.fit

    def step() -> None:
        y, f = stacked(x, internal_order=True)
        loss = (y**2).mean(1).sum() + f.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def new_native(mode: str) -> bool | None:
    """The working tree's choice of C kernels (None: use them) or PyTorch (False), as its dispatcher
    makes it (``msda.network.engines.prefer_native``, where it exists)."""
    try:
        from msda.network.engines import prefer_native
    except ImportError:
        return None
    return None if prefer_native(mode) else False


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
        package_at(args.against, Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'old' = {args.against}, 'new' = working tree")
        if "step" in what:
            x = torch.rand(384, DEFAULT_SCHEMA.n_features)
            fns = {"old": step_fn(engine_module("msda_at_rev", "stacked"), ensemble, x),
                   "new": step_fn(engine_module("msda", "stacked"), ensemble, x, new_native("train"))}
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
            ensemble.eval()
            x = torch.rand(4096, DEFAULT_SCHEMA.n_features)
            engines = {"old": engine_module("msda_at_rev", "fused").FusedEnsemble(ensemble),
                       "new": engine_module("msda", "fused").FusedEnsemble(ensemble, native=new_native("infer"))}
            print("C stage: " + ", ".join(f"{k} {e.native is not None}" for k, e in engines.items()))
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
