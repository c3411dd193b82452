"""The settings of a fit, without the machinery: ``TrainSettings`` (optimisation) and
``LossWeights`` (alpha, beta and the domain loss of METHOD.md's Eq. 1). Light to import: the
command line takes its defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from msda.errors import MsdaError

DOMAIN_LOSS_NAMES = ("coral", "mmd")  # msda.losses.DOMAIN_LOSSES holds their functions
METHODS = ("finetune", "ms", "da", "msda")
DEFAULT_ALPHA = 0.7


class TransferError(MsdaError):
    """Bad settings or data for pretraining or adaptation."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by pretraining and adaptation."""

    epochs: int = 50
    lr: float = 5e-4
    batch: int = 128
    average_last: int = 10  # the final weights are the mean over the last epochs
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    parts: int = 0  # members trained in this many parts side by side; 0: automatic (``auto_parts``)

    def check(self) -> None:
        if self.parts < 0:
            raise TransferError(f"parts must be >= 0 (0: automatic), got {self.parts}")
        if self.epochs < 1:
            raise TransferError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise TransferError(f"learning rate must be > 0, got {self.lr}")
        if self.batch < 2:
            raise TransferError(f"batch must be >= 2 (batch norm and covariances), got {self.batch}")
        if self.average_last < 1:
            raise TransferError(f"average_last must be >= 1, got {self.average_last}")


@dataclass(frozen=True)
class LossWeights:
    """alpha, beta and the domain loss; ``beta='auto'`` is Eq. 4, resolved per member."""

    alpha: float = 1.0
    beta: float | str = 0.0
    domain_loss: str = "coral"

    @classmethod
    def for_method(cls, method: str, alpha: float | None = None, beta: float | str | None = None, domain_loss: str = "coral") -> "LossWeights":
        """The method table of METHOD.md: finetune (1, 0), MS (alpha, 0), DA (1, auto), MSDA (alpha, auto).

        ``alpha`` may be set for MS and MSDA, ``beta`` for DA and MSDA; setting a value that the
        method fixes is an error (use MSDA for any other combination).
        """
        method = method.lower()
        if method not in METHODS:
            raise TransferError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        uses_9km = method in ("ms", "msda")
        uses_domain = method in ("da", "msda")
        if alpha is not None and not uses_9km and alpha != 1:
            raise TransferError(f"method {method} fixes alpha = 1 (no 9 km term); use ms or msda to set alpha")
        if beta is not None and not uses_domain and beta not in (0, 0.0):
            raise TransferError(f"method {method} fixes beta = 0 (no domain term); use da or msda to set beta")
        weights = cls(
            alpha=(DEFAULT_ALPHA if alpha is None else alpha) if uses_9km else 1.0,
            beta=("auto" if beta is None else beta) if uses_domain else 0.0,
            domain_loss=domain_loss,
        )
        weights.check()
        return weights

    def check(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise TransferError(f"alpha must be in [0, 1], got {self.alpha}")
        if isinstance(self.beta, str):
            if self.beta != "auto":
                raise TransferError(f"beta must be 'auto' or a number >= 0, got {self.beta!r}")
        elif not (math.isfinite(self.beta) and self.beta >= 0):
            raise TransferError(f"beta must be 'auto' or a number >= 0, got {self.beta}")
        if self.domain_loss not in DOMAIN_LOSS_NAMES:
            raise TransferError(f"unknown domain loss {self.domain_loss!r}; choose one of {', '.join(DOMAIN_LOSS_NAMES)}")

    @property
    def uses_9km(self) -> bool:
        return self.alpha < 1

    @property
    def uses_target(self) -> bool:
        return self.beta == "auto" or self.beta > 0
