"""One dispatcher per mode: the fastest engine that covers an ensemble's architecture.

Every engine class answers ``covers(arch, mode, n_series)`` for ``mode`` "train" or "infer" (and
the schema's series count: the fast engines need series); the engines are
tried fastest first and the reference modules, which cover every ``ArchSpec``, come last. Nothing
runs an architecture it does not cover.
"""

from __future__ import annotations

import torch

from msda.network.fused import FusedEnsemble
from msda.network.model import DenseSME
from msda.network.reference import ReferenceEngine, ReferenceParted
from msda.network.stacked import PartedEnsemble

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
    members in ``parts`` parts (``PartedEnsemble``, default spec) or the reference modules in one."""
    engine = engine_class(ensemble, "train")
    if engine is PartedEnsemble:
        return PartedEnsemble.from_ensemble(ensemble, parts, seed=seed, device=device)
    return ReferenceParted(ensemble, device)


def inference_engine(ensemble: DenseSME, device: str | torch.device = "cpu", compile: bool = False):
    """An eval-mode copy of ``ensemble`` in the fastest inference engine that covers it:
    ``FusedEnsemble`` (default spec; C convolutions on CPU) or the reference modules."""
    engine = engine_class(ensemble, "infer")
    if engine is FusedEnsemble:
        return FusedEnsemble(ensemble, device, compile=compile)
    return ReferenceEngine(ensemble, device)
