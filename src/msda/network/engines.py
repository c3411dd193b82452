"""One dispatcher per mode: the fastest engine that covers an ensemble's architecture.

Every engine class answers ``covers(arch, mode, n_series)`` for ``mode`` "train" or "infer" (and
the schema's series count: the fast engines need series); the engines are
tried fastest first and the reference modules, which cover every ``ArchSpec``, come last. Nothing
runs an architecture it does not cover.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import torch

from msda.network import native
from msda.network.fused import FusedEnsemble
from msda.network.model import DenseSME, MemberSpec
from msda.network.reference import ReferenceEngine, ReferenceParted
from msda.network.stacked import PartedEnsemble, StackedEnsemble

TRAINERS = (PartedEnsemble, ReferenceParted)  # fastest first
PREDICTORS = (FusedEnsemble, ReferenceEngine)


def engine_class(ensemble: DenseSME, mode: str) -> type:
    """The first engine of ``mode`` ("train" or "infer") that covers the ensemble's architecture."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode is 'train' or 'infer', got {mode!r}")
    for engine in TRAINERS if mode == "train" else PREDICTORS:
        if engine.covers(ensemble.arch, mode, ensemble.schema.n_series):
            return engine
    raise AssertionError("the reference engines cover every architecture")


def training_engine(ensemble: DenseSME, parts: int, seed: int, device: torch.device):
    """The members of ``ensemble`` (not changed) in the fastest trainer that covers them: the stacked
    members in ``parts`` parts (``PartedEnsemble``, default spec; its C kernels where they are the
    faster on this CPU) or the reference modules in one."""
    engine = engine_class(ensemble, "train")
    if engine is PartedEnsemble:
        parted = PartedEnsemble.from_ensemble(ensemble, parts, seed=seed, device=device)
        if torch.device(device).type == "cpu" and not prefer_native("train"):
            for part in parted.parts:
                part.native = False
        return parted
    return ReferenceParted(ensemble, device)


def inference_engine(ensemble: DenseSME, device: str | torch.device = "cpu", compile: bool = False):
    """An eval-mode copy of ``ensemble`` in the fastest inference engine that covers it:
    ``FusedEnsemble`` (default spec; C convolutions on CPU) or the reference modules."""
    engine = engine_class(ensemble, "infer")
    if engine is FusedEnsemble:
        on_cpu = torch.device(device).type == "cpu"
        return FusedEnsemble(ensemble, device, compile=compile,
                             native=False if on_cpu and not compile and not prefer_native("infer") else None)
    return ReferenceEngine(ensemble, device)


# ----- C kernels or PyTorch: measured once per machine ---------------------------------------
PROBE_MEMBERS = [MemberSpec(d, 16) for d in (1, 2, 3, 4, 5)]


def _choices_file():
    return native.cache_dir() / "choices.json"


def _choice_key(mode: str, threads: int) -> str:
    text = native.SOURCE.read_bytes() + repr((native._cpu_signature(), torch.__version__, threads, mode)).encode()
    return hashlib.sha256(text).hexdigest()[:20]


def _time_train(use_c: bool) -> float:
    g = torch.Generator().manual_seed(0)
    net = StackedEnsemble.from_ensemble(DenseSME(PROBE_MEMBERS, seed=0).float()).float().train()
    net.native = use_c
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(384, 153, generator=g, dtype=torch.float32)
    best = float("inf")
    for i in range(4):
        t0 = time.perf_counter()
        y, f = net(x, internal_order=True)
        loss = y.square().mean() + f.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            best = min(best, time.perf_counter() - t0)
    return best


def _time_infer(use_c: bool) -> float:
    g = torch.Generator().manual_seed(0)
    engine = FusedEnsemble(DenseSME(PROBE_MEMBERS, seed=0).float().eval(), native=use_c)
    x = torch.rand(2048, 153, generator=g, dtype=torch.float32)
    best = float("inf")
    for i in range(4):
        t0 = time.perf_counter()
        engine.member_outputs(x)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def prefer_native(mode: str) -> bool:
    """Whether the C kernels beat PyTorch's operations on this CPU for ``mode`` ("train" or
    "infer"). They do on some CPUs and not on others (2-3 x either way), so it is measured: once
    per CPU model, thread count and kernel source (a few seconds), cached in
    ``native.cache_dir()/choices.json``. ``MSDA_NATIVE=0`` or ``1`` decides instead."""
    forced = os.environ.get("MSDA_NATIVE")
    if forced in ("0", "1"):
        return forced == "1"
    return _measured_choice(mode, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _measured_choice(mode: str, threads: int) -> bool:
    """``prefer_native`` for ``threads`` threads: from the cache file, else measured and stored."""
    if native.conv_stage_library() is None:
        return False
    key = _choice_key(mode, threads)
    path = _choices_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return bool(cached[key]["native"])
    timer = _time_train if mode == "train" else _time_infer
    with torch.random.fork_rng(devices=[]):
        c, py = min(timer(True), timer(True)), min(timer(False), timer(False))
    record = {"native": c < py, "c_s": round(c, 5), "pytorch_s": round(py, 5), "mode": mode,
              "threads": threads, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:  # several processes may measure at once: the last write wins, each result is valid
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: record}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return record["native"]
