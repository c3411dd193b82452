"""25-member DenseSM-E inference throughput on CPU, as a fraction of the compute bound.

Prints, in one run: the SGEMM rate of this machine, the multiply-adds of one sample through
the 25 members (counted from the layers), our fused predictor (convolution stage in C, the
default on CPU; and in PyTorch, eager and compiled), the plain PyTorch module, and optionally
the authors' DWN modules (``--reference DIR``, a checkout of rszlj/Transfer-DenseSM-E). The
contenders run in turns (``--rounds``), so that the machine's changing speed hits them alike.

    python benchmarks/predict.py [--seconds 5] [--rounds 5] [--batch 4096] [--reference /tmp/ref]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from msda.network.model import DenseSME, pooled_length
from msda.predict import FusedEnsemble, predict

ISSUE_BOUND = 23_000  # samples/s: 3.5 M MAC/sample at ~160 GFLOP/s (foundation issue)


def sgemm_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        torch.mm(a, b)
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t) / 1e9


def macs_per_sample(e: DenseSME) -> int:
    total = 0
    for m in e.members:
        length = m.length
        for i, conv in enumerate((m.conv_block.conv1, m.conv_block.conv2, m.conv_block.conv3)):
            total += conv.in_channels * conv.out_channels * conv.kernel_size[0] * length
            length = length // 2 if i < 2 else pooled_length(m.length)
        total += sum(lin.in_features * lin.out_features for lin in m.modules() if isinstance(lin, torch.nn.Linear))
    return total


def rate(fn, x: torch.Tensor, seconds: float) -> float:
    fn(x)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        fn(x)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def rates_in_turns(fns: dict, x: torch.Tensor, seconds: float, rounds: int) -> dict[str, float]:
    """Samples per second of each function, run in turns for ``seconds`` in all each."""
    done = {k: [0, 0.0] for k in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < seconds / rounds:
                fn(x)
                n += x.shape[0]
            done[k][0] += n
            done[k][1] += time.perf_counter() - t
    return {k: n / s for k, (n, s) in done.items()}


def reference_fn(ref_dir: str, e: DenseSME):
    """The authors' DWN modules with our weights; their input step (series means) in numpy."""
    sys.path.insert(0, ref_dir)
    import DenseWideNet  # noqa: PLC0415  (the authors' module, run as it is)

    nets = []
    for spec, member in zip(e.specs, e.members):
        net = DenseWideNet.DWN(spec.width, spec.depth)
        net.load_state_dict(member.state_dict())
        nets.append(net.eval())

    def run(x: torch.Tensor) -> torch.Tensor:
        xn = x.numpy()
        means = np.nanmean(xn[:, 15:].reshape(len(xn), 3, 46), axis=2)
        xin = torch.from_numpy(np.concatenate([xn[:, :15], means, xn[:, 15:]], axis=1))
        with torch.no_grad():
            return torch.stack([net(xin)[:, 0] for net in nets], 1).mean(1)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="per contender, over all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reference", default=None, help="checkout of rszlj/Transfer-DenseSM-E")
    args = ap.parse_args()

    e = DenseSME(seed=0).eval()
    x = torch.rand(args.batch, 153)
    gflops = sgemm_gflops()
    macs = macs_per_sample(e)
    bound = gflops * 1e9 / (2 * macs)
    print(f"threads {torch.get_num_threads()}, SGEMM {gflops:.0f} GFLOP/s, {macs / 1e6:.2f} M MAC/sample")
    print(f"compute bound: {bound:,.0f} samples/s at the measured SGEMM rate; issue's figure {ISSUE_BOUND:,}")

    engine = FusedEnsemble(e)
    pytorch_convs = FusedEnsemble(e, native=False)
    t0 = time.perf_counter()
    compiled = FusedEnsemble(e, compile=True)
    predict(compiled, x[:1])
    print(f"torch.compile of the PyTorch convolution stage: {time.perf_counter() - t0:.1f} s (once)")
    print(f"convolution stage in C: {'yes' if engine.native is not None else 'no (no C compiler)'}")

    def plain(b):
        with torch.inference_mode():
            return e(b)

    fns = {
        "msda fused": lambda b: predict(engine, b, batch_size=args.batch),
        "msda fused, PyTorch convs": lambda b: predict(pytorch_convs, b, batch_size=args.batch),
        "msda fused+compile": lambda b: predict(compiled, b, batch_size=args.batch),
        "plain nn.Module": plain,
    }
    if args.reference:
        fns["authors' DWN"] = reference_fn(args.reference, e)
    results = rates_in_turns(fns, x, args.seconds, args.rounds)
    for name, r in results.items():
        print(
            f"{name:>26}: {r:9,.0f} samples/s = {r / ISSUE_BOUND:5.1%} of the issue's bound, "
            f"{r / bound:5.1%} of the measured bound"
        )
    base = results["msda fused"]
    for name, r in results.items():
        if name != "msda fused":
            print(f"msda fused / {name}: {base / r:.2f}x")


if __name__ == "__main__":
    main()
