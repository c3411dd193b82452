"""Figures of a fit: loss curves per member and measured against predicted soil moisture."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from msda.metrics import scores  # noqa: E402
from msda.tables import TRUTH  # noqa: E402

TERMS = (("joint", "joint"), ("fine_50m", "50 m MSE"), ("coarse_9km", "9 km MSE"), ("domain", "domain"),
         ("monitor_rmse", "target RMSE (ensemble)"))


def plain(text: object) -> str:
    """A user's name (station, network, folder) as literal figure text: ``$`` would start
    matplotlib's TeX-like math mode, and an unbalanced or invalid formula stops the figure."""
    return str(text).replace("$", r"\$")


def count_colorbar(fig, ax, mappable, label: str = "samples per cell") -> None:
    """A colour bar of the counts a hexbin or hist2d drew, where it drew any (a log scale of an
    empty or one-valued plot has no range)."""
    counts = np.asarray(mappable.get_array(), dtype=float)
    counts = counts[np.isfinite(counts)]
    if counts.size and counts.max() > counts.min():
        fig.colorbar(mappable, ax=ax, label=label, shrink=0.85)


def loss_curves(losses: pd.DataFrame, out: Path, title: str = "") -> None:
    """One panel per loss term: each member thin, the member median thick, log scale."""
    terms = [(c, label) for c, label in TERMS if c in losses and losses[c].notna().any()]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.2), squeeze=False)
    for ax, (col, label) in zip(axes[0], terms):
        wide = losses.pivot(index="epoch", columns="member", values=col)
        ax.plot(wide.index, wide.to_numpy(), color="0.6", lw=0.6)
        ax.plot(wide.index, wide.median(axis=1), color="C0", lw=2, label="median member")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(label)
    axes[0][0].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(plain(title))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def target_scatter(target: pd.DataFrame, out: Path, method: str) -> None:
    """Density scatter of in-situ against predicted, pretrained beside adapted, with the 1:1 line."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0), sharex=True, sharey=True)
    truth = target[TRUTH].to_numpy()
    hi = float(np.nanpercentile(np.r_[truth, target["adapted"], target["pretrained"]], 99.5)) * 1.05
    for ax, (col, name) in zip(axes, (("pretrained", "pretrained"), ("adapted", method))):
        pred = target[col].to_numpy()
        s = scores(truth, pred)
        hb = ax.hexbin(truth, pred, gridsize=60, extent=(0, hi, 0, hi), bins="log", mincnt=1, cmap="viridis")
        count_colorbar(fig, ax, hb)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(f"{name}: RMSE {s['rmse']:.3f}, R {s['r']:.2f}, bias {s['bias']:+.3f}", fontsize=9)
        ax.set_xlabel("in situ (m$^3$/m$^3$)")
    axes[0].set_ylabel("predicted (m$^3$/m$^3$)")
    fig.suptitle(f"target stations ({len(target)} samples)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
