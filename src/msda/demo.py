"""The foundation demo: every format and the inference path, end to end, on seeded inputs.

Until the benchmark generator lands there is no physical data set in the package, so the demo
draws raw inputs uniformly inside the Table 1 ranges and uses an untrained, seeded DenseSM-E:
its numbers exercise the machinery (formats, normalisation, prediction speed), they are not
soil moisture.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msda.model import DenseSME
from msda.predict import predict_table
from msda.schema import DEFAULT_SCHEMA, FeatureSchema
from msda.weights import load_ensemble, provenance, save_authors, save_ensemble


def random_raw_inputs(n: int, schema: FeatureSchema = DEFAULT_SCHEMA, seed: int = 0) -> pd.DataFrame:
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


def run_demo(out: Path, rows: int = 200_000, seed: int = 0, echo: Callable[[str], None] = print) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = DEFAULT_SCHEMA
    DEFAULT_SCHEMA.save(out / "schema_table1.yaml")
    echo(f"schema: {schema.name}, {schema.n_features} columns -> {out / 'schema_table1.yaml'}")

    ensemble = DenseSME(schema=schema, seed=seed).eval()
    save_authors(ensemble, out / "weights_authors")
    authors = load_ensemble(out / "weights_authors")
    save_ensemble(authors, out / "weights", provenance(kind="untrained initialisation", seed=seed))
    ours = load_ensemble(out / "weights")
    echo(f"weights: 25 members written as the authors' .pt files and as safetensors -> {out / 'weights'}")

    raw = random_raw_inputs(rows, schema, seed)
    features = schema.encode(raw)
    table = pd.DataFrame(schema.normalise(features), columns=schema.feature_names)
    table.insert(0, "sample", np.arange(rows))
    table.to_parquet(out / "inputs.parquet", index=False)
    back = schema.denormalise(table[schema.feature_names].to_numpy())
    err = np.abs(back.to_numpy() - features.to_numpy()).max()
    echo(f"inputs: {rows} samples normalised through the schema (round-trip max error {err:.2g})")

    x = torch.tensor(table[schema.feature_names].to_numpy()[:2048])
    with torch.inference_mode():
        same = torch.equal(authors.member_outputs(x), ours.member_outputs(x))
    echo(f"authors' .pt and safetensors weights give identical outputs: {same}")

    t0 = time.perf_counter()
    n = predict_table(ours, out / "inputs.parquet", out / "predictions.parquet")
    dt = time.perf_counter() - t0
    pred = pd.read_parquet(out / "predictions.parquet", columns=["sm_pred", "sm_std"])
    echo(
        f"predict: {n} samples in {dt:.1f} s ({n / dt:,.0f} samples/s, {torch.get_num_threads()} threads); "
        f"mean member spread {pred['sm_std'].mean():.3f} (untrained weights: not soil moisture)"
    )
    echo(f"outputs in {out}/")
