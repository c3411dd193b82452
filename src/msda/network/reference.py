"""The reference engines: plain ``DenseSM`` modules behind the interfaces of the fast ones.

They cover every ``ArchSpec``; the fast engines (``stacked`` for training, ``fused`` for
inference) cover the default spec only, and the dispatchers (``engines``) fall back to these.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from msda.network.model import DenseSME
from msda.network.spec import ArchSpec


class ReferenceStack(nn.Module):
    """The members of an ensemble as their own modules, with a ``StackedEnsemble`` part's
    interface: ``forward(x, internal_order)`` gives outputs (m, B) and features (m, B, F)."""

    def __init__(self, ensemble: DenseSME):
        super().__init__()
        self.specs, self.schema, self.arch = list(ensemble.specs), ensemble.schema, ensemble.arch
        self.members = nn.ModuleList(copy.deepcopy(m) for m in ensemble.members)
        self.order = list(range(len(self.specs)))
        self.generator: torch.Generator | None = None  # dropout draws from torch's generator

    def forward(self, x: torch.Tensor, internal_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x, return_features=True) for m in self.members]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def to_ensemble(self) -> DenseSME:
        """A fresh ``DenseSME`` (CPU, this dtype, eval mode) holding these members' parameters."""
        dtype = next(self.parameters()).dtype
        ensemble = DenseSME(self.specs, schema=self.schema, arch=self.arch).to(dtype=dtype)
        for target, member in zip(ensemble.members, self.members):
            target.load_state_dict({k: v.detach().cpu() for k, v in member.state_dict().items()})
        return ensemble.eval()


class ReferenceParted(nn.Module):
    """``PartedEnsemble``'s interface over one ``ReferenceStack``: the trainer of any spec."""

    def __init__(self, ensemble: DenseSME, device: torch.device | str | None = None):
        super().__init__()
        self.specs, self.schema = list(ensemble.specs), ensemble.schema
        self.members = [list(range(len(self.specs)))]
        self.parts = nn.ModuleList([ReferenceStack(ensemble)])
        self.order = list(range(len(self.specs)))
        self.inverse = list(self.order)
        if device is not None:
            self.to(device)

    @staticmethod
    def covers(arch: ArchSpec, mode: str, n_series: int = 1) -> bool:
        return mode == "train"

    def forward(self, x: torch.Tensor, internal_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts[0](x)

    def to_ensemble(self) -> DenseSME:
        return self.parts[0].to_ensemble()


class ReferenceEngine:
    """``FusedEnsemble``'s interface (``member_outputs``, ``member_features``) on an eval-mode
    copy of the ensemble's own modules."""

    def __init__(self, ensemble: DenseSME, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.names = ensemble.names
        self.n_members = len(ensemble.members)
        self.members = [copy.deepcopy(m).eval().to(self.device) for m in ensemble.members]
        self.native = None

    @staticmethod
    def covers(arch: ArchSpec, mode: str, n_series: int = 1) -> bool:
        return mode == "infer"

    @torch.inference_mode()
    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's prediction, shape (batch, n_members)."""
        if x.shape[0] == 0:
            return torch.empty(0, self.n_members, device=x.device, dtype=x.dtype)
        return torch.stack([m(x) for m in self.members], dim=1)

    @torch.inference_mode()
    def member_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's prediction (n_members, batch) and bottleneck features (n_members, batch, F)."""
        outs = [m(x, return_features=True) for m in self.members]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
