"""The synthetic CONUS benchmark: the embedded default data of ``make demo`` and the tests."""

from __future__ import annotations

import json
from pathlib import Path

from msda.errors import MsdaError
from msda.io import atomic_path
from msda.simulate.generator import NETWORKS, Benchmark, SimConfig, simulate
from msda.tables import write_samples

__all__ = ["NETWORKS", "Benchmark", "SimConfig", "simulate", "write_benchmark", "write_validation"]

FILES = {"parquet": ("fine.parquet", "coarse.parquet", "pretrain.parquet"),
         "csv": ("input_fine.csv", "input_9km.csv", "input_pretrain_9km.csv")}


def write_validation(bench: Benchmark, folder: Path):
    """``validation.json`` and ``validation.png``: the benchmark against real-world statistics."""
    from msda.simulate.validate import draw_validation, validate

    table = validate(bench)
    records = json.loads(table.to_json(orient="records"))
    (folder / "validation.json").write_text(json.dumps({"network": "SCAN", "statistics": records}, indent=2))
    draw_validation(table, folder / "validation.png")
    return table


def write_benchmark(bench: Benchmark, out: str | Path, fmt: str = "parquet", plots: bool = False,
                    force: bool = False) -> Path:
    """Write the three tables, the stations and the settings into ``out`` (atomically, as a folder)."""
    if fmt not in FILES:
        raise MsdaError(f"--format must be parquet or csv, got {fmt!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MsdaError(f"{out}: exists and is not a directory")
    from msda.provenance import provenance

    with atomic_path(out, "benchmark", force=force) as tmp:
        tmp.mkdir()
        for samples, name in zip((bench.fine, bench.coarse, bench.pretrain), FILES[fmt]):
            write_samples(samples, tmp / name)
        bench.stations.to_csv(tmp / "stations.csv", index=False)
        meta = provenance(generator="msda.simulate", **vars(bench.config))
        meta["counts"] = {"fine": len(bench.fine), "coarse": len(bench.coarse), "pretrain": len(bench.pretrain),
                          "stations": len(bench.stations)}
        (tmp / "settings.json").write_text(json.dumps(meta, indent=2, default=str))
        write_validation(bench, tmp)
        if plots:
            from msda.simulate.plots import draw_all

            draw_all(bench, tmp)
    return out
