from __future__ import annotations

import sys
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from msda.network.model import DenseSME, MemberSpec
from msda.schema import DEFAULT_SCHEMA
from msda.tables import Samples, samples_from_frame


def random_raw_inputs(n: int, schema=DEFAULT_SCHEMA, seed: int = 0) -> pd.DataFrame:
    """Raw inputs drawn uniformly in each input's range; encoded inputs from their sources."""
    rng = np.random.default_rng(seed)
    raw: dict[str, np.ndarray] = {}
    for s in schema.scalars:
        if s.encoding is None:
            raw[s.name] = rng.uniform(s.lo, s.hi, n)
        elif s.encoding.source not in raw:
            hi = s.encoding.period if s.encoding.func != "ratio" else s.encoding.period * s.hi
            raw[s.encoding.source] = rng.uniform(0, hi, n)
    for s in schema.series:
        for c in s.column_names():
            raw[c] = rng.uniform(s.lo, s.hi, n)
    return pd.DataFrame(raw)


def make_frame(kind: str = "fine", n_stations: int = 4, n_dates: int = 6, seed: int = 0) -> pd.DataFrame:
    """A small table in our layout: stations x dates, normalised random inputs, truth in (0, 0.5)."""
    rng = np.random.default_rng(seed)
    n = n_stations * n_dates
    raw = random_raw_inputs(n, DEFAULT_SCHEMA, seed)
    feats = pd.DataFrame(DEFAULT_SCHEMA.normalise(DEFAULT_SCHEMA.encode(raw)), columns=DEFAULT_SCHEMA.feature_names)
    ids = pd.DataFrame(
        {
            "network": np.repeat(["SCAN", "USCRN", "SCAN", "ARM"][:n_stations] * 1, n_dates)[:n]
            if n_stations <= 4
            else np.repeat([f"NET{i % 3}" for i in range(n_stations)], n_dates),
            "station": np.repeat([f"st{i}" for i in range(n_stations)], n_dates),
            "r": np.repeat(rng.integers(300, 500, n_stations), n_dates),
            "c": np.repeat(rng.integers(700, 1200, n_stations), n_dates),
            "date": np.tile(pd.date_range("2017-03-01", periods=n_dates, freq="6D"), n_stations),
            "lc": np.repeat(rng.integers(1, 17, n_stations), n_dates),
            "sm_m3m3": rng.uniform(0.02, 0.5, n),
        }
    )
    frame = pd.concat([ids, feats], axis=1)
    if kind == "coarse":
        frame = frame.drop(columns=["network", "station"])
        frame["r"] = np.repeat(np.arange(n_stations) + 300, n_dates)
    return frame


@pytest.fixture
def fine() -> Samples:
    return samples_from_frame(make_frame("fine"), "fine")


@pytest.fixture
def coarse() -> Samples:
    return samples_from_frame(make_frame("coarse"), "coarse")


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics so that eval-mode tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.num_batches_tracked.fill_(7)


@pytest.fixture
def small_ensemble() -> DenseSME:
    e = DenseSME([MemberSpec(1, 8), MemberSpec(2, 16), MemberSpec(3, 8)], seed=1)
    randomise_batchnorm(e)
    return e.eval()


@pytest.fixture
def full_ensemble() -> DenseSME:
    e = DenseSME(seed=2)
    randomise_batchnorm(e, seed=3)
    return e.eval()


def run_cli(args, capsys):
    """The installed entry point (errors as one line, exit 2), in this process."""
    from msda.cli import run

    with mock.patch.object(sys, "argv", ["msda", *args]), pytest.raises(SystemExit) as stop:
        run()
    return stop.value.code, capsys.readouterr().err
