"""Losses of the transfer methods (METHOD.md section 5), batched over ensemble members.

Every function takes stacked tensors with a leading member axis and returns one value per
member, so that all members of an ensemble are trained in one step.
"""

from __future__ import annotations

import torch

from msda.settings import DOMAIN_LOSS_NAMES


def mse(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error per member: pred (m, n), truth (n,) -> (m,)."""
    return (pred - truth).square().mean(dim=-1)


def covariance(f: torch.Tensor) -> torch.Tensor:
    """Unbiased feature covariance per member: (m, n, d) -> (m, d, d)."""
    n = f.shape[-2]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    c = f - f.mean(dim=-2, keepdim=True)
    return c.transpose(-1, -2) @ c / (n - 1)


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CORAL (Eq. 2): ||C_S - C_T||_F^2 / (4 d^2) per member.

    source (m, n_s, d), target (m, n_t, d) -> (m,). The two sets may differ in size.
    """
    d = source.shape[-1]
    diff = covariance(source) - covariance(target)
    return diff.square().sum(dim=(-1, -2)) / (4 * d * d)


def mmd(source: torch.Tensor, target: torch.Tensor, kernels: int = 5, multiplier: float = 2.0) -> torch.Tensor:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels, per member.

    The bandwidths are ``base * multiplier**k`` (k centred on 0) around ``base`` = the mean
    pairwise squared distance of the pooled batch, as in DAN (Long et al. 2015), the MMD
    the authors' code offers beside CORAL. Biased (V-statistic) estimate.
    """
    n_s = source.shape[-2]
    pooled = torch.cat((source, target), dim=-2)  # (m, n, d)
    n = pooled.shape[-2]
    sq = torch.cdist(pooled, pooled).square()
    base = sq.sum(dim=(-1, -2), keepdim=True).detach() / (n * n - n)
    base = base.clamp_min(torch.finfo(pooled.dtype).tiny)
    k = sum(torch.exp(-sq / (base * multiplier ** (i - kernels // 2))) for i in range(kernels))
    kss = k[..., :n_s, :n_s].mean(dim=(-1, -2))
    ktt = k[..., n_s:, n_s:].mean(dim=(-1, -2))
    kst = k[..., :n_s, n_s:].mean(dim=(-1, -2))
    return kss + ktt - 2 * kst


DOMAIN_LOSSES = {"coral": coral, "mmd": mmd}
assert tuple(DOMAIN_LOSSES) == DOMAIN_LOSS_NAMES
