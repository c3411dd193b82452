"""The ``msda`` command line: parses options and calls the library; errors print as one line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from msda.errors import MsdaError
from msda.settings import LossWeights, TrainSettings

app = typer.Typer(
    help="msda: 50 m soil moisture from Sentinel-1 with multi-scale domain adaptation of DenseSM-E.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(help="Inspect and convert DenseSM-E weights.", no_args_is_help=True)
schema_app = typer.Typer(help="Show or write feature schemas.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
app.add_typer(schema_app, name="schema")
prepare_app = typer.Typer(help="Prepare samples from real sources (ISMN, ...).", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
samples_app = typer.Typer(help="Build sample tables from your own raw tables.", no_args_is_help=True)
app.add_typer(samples_app, name="samples")

_state = {"debug": False}

ThreadsOpt = typer.Option(0, "--threads", min=0, help="CPU threads (0: the cores this process may use, from its affinity "
                          "and cgroup quota; MSDA_THREADS or OMP_NUM_THREADS when set).")
SchemaOpt = typer.Option(None, "--schema", help="Feature schema file (TOML/YAML/JSON); default: Table 1.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing --out that msda did not write (never an input).")
_TRAIN, _LOSS = TrainSettings(), LossWeights()  # the defaults of every fit option
ArchOpt = typer.Option(None, "--arch", help="Architecture file (TOML/YAML/JSON, keys of msda.network.ArchSpec); default: the paper's.")


def _out(out: Path, kind: str, *inputs, force: bool = False) -> None:
    """Check --out before any work: not the working directory, an input, or foreign files."""
    from msda.io import check_output

    check_output(out, kind, inputs, force)


def _schema(path: Optional[Path]):
    from msda.schema import DEFAULT_SCHEMA, load_schema

    return DEFAULT_SCHEMA if path is None else load_schema(path)


def _arch(path: Optional[Path]):
    from msda.network.spec import DEFAULT_ARCH, ArchSpec

    return DEFAULT_ARCH if path is None else ArchSpec.load(path)


def _threads(threads: int) -> None:
    from msda.runtime import configure_threads

    configure_threads(threads)


def _scheduler(address: Optional[str]) -> None:
    if address not in (None, "inline"):
        from msda.runtime import check_scheduler_address

        check_scheduler_address(address)


def _networks(value: Optional[str]) -> Optional[list[str]]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command()
def predict(
    weights: Path = typer.Option(..., "--weights", "-w", help="Our weights directory, or the authors' .pt directory/file."),
    samples: Path = typer.Option(..., "--samples", "-s", help="Sample table (.csv authors' layout or .parquet)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output table (.parquet or .csv)."),
    schema: Optional[Path] = SchemaOpt,
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    batch: int = typer.Option(4096, min=1, help="Samples per forward pass."),
    chunk_rows: int = typer.Option(200_000, min=1, help="Rows read at a time (bounds memory)."),
    members: bool = typer.Option(True, "--members/--no-members", help="Write each member's prediction."),
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop rows with NaN features instead of failing."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the PyTorch convolutions (for GPUs)."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Keep the raw ensemble mean (default: clipped to [0, truth_max], flag 8)."),
    training_table: Optional[Path] = typer.Option(None, "--training-table", help="Sample table whose feature ranges flag extrapolated rows (flag 4)."),
    force: bool = ForceOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Predict soil moisture (m3/m3): ensemble mean (clipped to the physical range), member spread,
    per-member values and a flag per row (2: an input outside the schema's range, 4: outside the
    training table's, 8: the mean was clipped)."""
    _threads(threads)
    from msda.mapping import training_ranges
    from msda.predict import predict_table
    from msda.weights import load_ensemble

    _out(out, "predictions", weights, samples, schema, training_table, force=force)
    sch = _schema(schema)
    ensemble = load_ensemble(weights, schema=sch if schema is not None else None)
    ranges = training_ranges(training_table, ensemble.schema) if training_table else None
    t0 = time.perf_counter()
    rows = predict_table(ensemble, samples, out, chunk_rows, batch, device, members, drop_nan, compile=compile,
                         force=force, clip=not no_clip, ranges=ranges)
    dt = time.perf_counter() - t0
    typer.echo(f"wrote {out}: {rows} rows, {len(ensemble.specs)} members, {rows / dt:,.0f} samples/s")


@app.command()
def calibrate(
    weights: Path = typer.Option(..., "--weights", "-w", help="Our weights directory (the calibration goes into its manifest)."),
    samples: Path = typer.Option(..., "--samples", "-s", help="50 m samples of stations the weights did not train on."),
    level: float = typer.Option(0.9, "--level", help="Coverage of the interval, e.g. 0.9."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    threads: int = ThreadsOpt,
) -> None:
    """Fit a conformal scale of the member spread on held-out stations: predict and its
    sm_lo / sm_hi then cover the truth at --level (docs/formats.md)."""
    _threads(threads)
    from msda.calibrate import calibrate_weights

    rec = calibrate_weights(weights, samples, level, device=device)
    typer.echo(f"calibrated {weights}: {rec['level']:.0%} interval = mean +- {rec['scale']:.3f} x max(spread, "
               f"{rec['floor']:g}) from {rec['samples']} samples of {rec['stations']} stations "
               f"(coverage there {rec['coverage_on_calibration']:.1%})")


@app.command()
def validate(
    table: Path = typer.Argument(..., help="Sample table (.csv or .parquet)."),
    kind: Optional[str] = typer.Option(None, help="fine or coarse (inferred when omitted)."),
    schema: Optional[Path] = SchemaOpt,
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop rows with NaN features and report the count."),
    networks: Optional[str] = typer.Option(None, help="Comma-separated networks to keep."),
) -> None:
    """Check a sample table and print a summary (schema: --schema, else the one the file records)."""
    from msda.tables import read_samples, unnormalised_columns

    s = read_samples(table, _kind(kind), None if schema is None else _schema(schema), drop_nan, _networks(networks))
    _summary(s)
    bad = unnormalised_columns(s)
    if bad:
        shown = ", ".join(f"{c} ({lo:.3g} to {hi:.3g})" for c, lo, hi in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        typer.echo(f"looks unnormalised: {len(bad)} feature columns outside [0, 1]: {shown}. Model inputs are "
                   "normalised to the schema's ranges (msda.schema: schema.normalise(schema.encode(frame)))")


@samples_app.command("build")
def samples_build(
    raw: Path = typer.Option(..., "--raw", help="Raw table (.csv or .parquet): inputs in the schema's physical units, "
                             "date, lat/lon (or r/c), the truth, station and network."),
    schema: Path = typer.Option(..., "--schema", help="Feature schema file (TOML/YAML/JSON)."),
    kind: str = typer.Option(..., "--kind", help="fine (50 m, in-situ truth) or coarse (9 km, SMAP truth)."),
    out: Path = typer.Option(..., "--out", "-o", help="Sample table to write (.parquet; .csv for the authors' layout)."),
    truth: str = typer.Option("sm_m3m3", "--truth", help="Column of soil moisture in m3/m3."),
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop rows with a missing input and report the count."),
    force: bool = ForceOpt,
) -> None:
    """Normalise and validate a raw table into a sample table (docs/formats.md, "Your own data")."""
    import warnings

    from msda.samples import build_samples, read_raw
    from msda.tables import write_samples

    if kind not in ("fine", "coarse"):
        raise MsdaError(f"--kind is fine or coarse, got {kind!r}")
    _out(out, "samples", raw, schema, force=force)
    the_schema = _schema(schema)
    frame = read_raw(raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = build_samples(frame, the_schema, kind, truth=truth, drop_nan=drop_nan, source=str(raw))
    write_samples(samples, out, force=force)
    for w in caught:
        typer.echo(f"warning: {w.message}")
    _summary(samples)
    typer.echo(f"wrote {out}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Input table (.csv or .parquet)."),
    dst: Path = typer.Argument(..., help="Output table; .csv writes the authors' layout, .parquet ours."),
    kind: Optional[str] = typer.Option(None, help="fine or coarse (inferred when omitted)."),
    schema: Optional[Path] = SchemaOpt,
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop rows with NaN features and report the count."),
    networks: Optional[str] = typer.Option(None, help="Comma-separated networks to keep."),
    force: bool = ForceOpt,
) -> None:
    """Convert a sample table between the authors' CSV and our Parquet layout (validated)."""
    from msda.tables import read_samples, write_samples

    _out(dst, "samples", src, schema, force=force)
    s = read_samples(src, _kind(kind), None if schema is None else _schema(schema), drop_nan, _networks(networks))
    write_samples(s, dst, force=force)
    _summary(s)
    typer.echo(f"wrote {dst}")


def _kind(kind: Optional[str]):
    if kind not in (None, "fine", "coarse"):
        raise MsdaError(f"--kind must be fine or coarse, got {kind!r}")
    return kind


def _summary(s) -> None:
    f = s.frame
    typer.echo(f"{s.source}: {len(s)} {s.kind} samples, schema {s.schema.name} ({s.schema.n_features} features)")
    if s.dropped_nan:
        typer.echo(f"dropped {s.dropped_nan} rows with NaN features")
    if "station" in f:
        typer.echo(f"stations: {f['station'].nunique()}; networks: {', '.join(s.networks)}")
    typer.echo(f"9 km cells: {f[['r', 'c']].drop_duplicates().shape[0]}; dates {f['date'].min():%Y-%m-%d} to {f['date'].max():%Y-%m-%d}")
    typer.echo(f"sm_m3m3: mean {f['sm_m3m3'].mean():.3f}, min {f['sm_m3m3'].min():.3f}, max {f['sm_m3m3'].max():.3f}")


@weights_app.command("info")
def weights_info(weights: Path = typer.Argument(..., help="Weights directory or file.")) -> None:
    """List the members, schema and provenance of a set of weights."""
    from msda.weights import load_ensemble

    e = load_ensemble(weights)
    n_params = sum(p.numel() for p in e.parameters())
    typer.echo(f"{weights}: {len(e.specs)} members, {n_params:,} parameters, schema {e.schema.name}")
    typer.echo("members: " + ", ".join(e.names))
    typer.echo(f"architecture{' (default)' if e.arch.is_default else ''}: {e.arch.describe()}")
    cal = getattr(e, "calibration", None)
    if cal:
        typer.echo(f"calibration: {cal['level']:.0%} interval = mean +- {cal['scale']:.3f} x max(spread, {cal['floor']:g}), "
                   f"from {cal['samples']} samples of {cal['stations']} stations ({cal['source']})")
    for k, v in getattr(e, "provenance", {}).items():
        typer.echo(f"  {k}: {v}")


@weights_app.command("convert")
def weights_convert(
    src: Path = typer.Argument(..., help="Weights: our directory or the authors' .pt directory/file."),
    dst: Path = typer.Argument(..., help="Output directory."),
    to: str = typer.Option("msda", help="msda (safetensors + manifest) or authors (one .pt per member)."),
    force: bool = ForceOpt,
) -> None:
    """Convert weights between the authors' .pt files and our safetensors format."""
    from msda.provenance import provenance
    from msda.weights import load_ensemble, save_authors, save_ensemble

    if to not in ("msda", "authors"):
        raise MsdaError(f"--to must be msda or authors, got {to!r}")
    _out(dst, "weights", src, force=force)
    e = load_ensemble(src)
    if to == "msda":
        save_ensemble(e, dst, provenance(converted_from=str(src), source=getattr(e, "provenance", {})), force=force)
    elif to == "authors":
        if not e.schema.is_default or not e.arch.is_default:
            raise MsdaError(f"{src}: only Table 1 weights of the default architecture can be written in the authors' layout")
        save_authors(e, dst, force=force)
    else:
        raise MsdaError(f"--to must be msda or authors, got {to!r}")
    typer.echo(f"wrote {dst} ({len(e.specs)} members)")


@weights_app.command("init")
def weights_init(
    out: Path = typer.Option(..., "--out", "-o", help="Output weights directory."),
    seed: int = typer.Option(0, help="Seed of the initialisation."),
    widths: str = typer.Option("8,16,32,64,128", help="Comma-separated widths w."),
    depths: str = typer.Option("1,2,3,4,5", help="Comma-separated depths d."),
    schema: Optional[Path] = SchemaOpt,
    arch: Optional[Path] = ArchOpt,
    force: bool = ForceOpt,
) -> None:
    """Write an untrained, seeded DenseSM-E (the starting point of training from scratch)."""
    from msda.network.model import DenseSME
    from msda.provenance import provenance
    from msda.weights import save_ensemble

    _out(out, "weights", schema, arch, force=force)
    e = DenseSME(_members(widths, depths), schema=_schema(schema), seed=seed, arch=_arch(arch))
    save_ensemble(e, out, provenance(kind="untrained initialisation", seed=seed), force=force)
    typer.echo(f"wrote {out} ({len(e.specs)} untrained members, seed {seed})")


@schema_app.command("show")
def schema_show(schema: Optional[Path] = typer.Argument(None, help="Schema file; default: Table 1.")) -> None:
    """Print the inputs of a schema with units, ranges and encodings."""
    s = _schema(schema)
    series = f" + {s.n_series} series x {s.series_length}" if s.n_series else " (no series)"
    typer.echo(f"schema {s.name}: {s.n_scalars} scalars{series} = {s.n_features} columns")
    items = [*s.scalars, *s.series]
    name_w = max(len(i.name) for i in items)
    units_w = max(len(i.units) for i in items)
    last = s.n_features - 1
    col_w = len(f"[{last}-{last}]") if s.series else len(f"[{last}]")
    col = 0
    for sc in s.scalars:
        enc = ""
        if sc.encoding is not None:
            e = sc.encoding
            arg = f"{e.source}/{e.period:g}" if e.func == "ratio" else f"2 pi {e.source}/{e.period:g}"
            enc = f"  = {arg}" if e.func == "ratio" else f"  = {e.func}({arg})"
        typer.echo(f"  {f'[{col}]':>{col_w}} {sc.name:<{name_w}} {sc.units:<{units_w}} [{sc.lo:g}, {sc.hi:g}]{enc}")
        col += 1
    for se in s.series:
        where = f"[{col}-{col + se.length - 1}]"
        typer.echo(f"  {where:>{col_w}} {se.name:<{name_w}} {se.units:<{units_w}} [{se.lo:g}, {se.hi:g}] "
                   f"{se.length} x {se.step_days} days")
        col += se.length


@schema_app.command("write")
def schema_write(out: Path = typer.Argument(..., help="Output .toml, .yaml or .json file to edit."),
                 force: bool = ForceOpt) -> None:
    """Write the default Table 1 schema to a file, as a template for your own."""
    from msda.schema import DEFAULT_SCHEMA

    DEFAULT_SCHEMA.save(out, force=force)
    typer.echo(f"wrote {out}")


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    scale: float = typer.Option(1.0, help="Fraction of the Table 2 station counts (e.g. 0.1 for tests)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same tables."),
    format: str = typer.Option("parquet", "--format", help="parquet (ours) or csv (the authors' layout)."),
    plots: bool = typer.Option(False, "--plots", help="Draw the map, a station series, VV vs SM, 9 km vs 50 m."),
    networks: Optional[str] = typer.Option(None, help="Comma-separated networks (default: all seven)."),
    start: str = typer.Option("2016-01-01", help="First Sentinel-1 date."),
    end: str = typer.Option("2021-12-31", help="Last Sentinel-1 date."),
    validate: bool = typer.Option(False, "--validate", help="Print the benchmark's statistics beside their real-world ranges (always written to validation.json/png)."),
    force: bool = ForceOpt,
) -> None:
    """Generate the synthetic CONUS benchmark: fine (50 m), coarse (9 km) and pretraining tables."""
    from msda.simulate import FILES, NETWORKS, SimConfig, simulate as run_sim, write_benchmark

    if format not in FILES:
        raise MsdaError(f"--format must be parquet or csv, got {format!r}")
    _out(out, "benchmark", force=force)
    cfg = SimConfig(scale=scale, seed=seed, start=start, end=end, networks=tuple(_networks(networks) or NETWORKS))
    t0 = time.perf_counter()
    bench = run_sim(cfg)
    write_benchmark(bench, out, format, plots, force=force)
    typer.echo(
        f"wrote {out}: {len(bench.stations)} stations, {len(bench.fine)} fine, {len(bench.coarse)} coarse, "
        f"{len(bench.pretrain)} pretraining samples in {time.perf_counter() - t0:.1f} s"
    )
    if validate:
        import json

        rows = json.loads((out / "validation.json").read_text())["statistics"]  # as write_benchmark found them
        typer.echo(f"against real-world statistics ({sum(r['inside'] for r in rows)} of {len(rows)} inside; "
                   f"{out}/validation.png):")
        for r in rows:
            mark = "inside " if r["inside"] else "OUTSIDE"
            typer.echo(f"  {mark} {r['statistic']:<30} {r['generated']:8.3f}  real [{r['lo']:g}, {r['hi']:g}]  {r['source']}")


def _members(widths: str, depths: str):
    from msda.network.model import default_members

    try:
        ws, ds = [int(v) for v in widths.split(",")], [int(v) for v in depths.split(",")]
    except ValueError:
        raise MsdaError(f"--widths and --depths take comma-separated integers, got {widths!r} / {depths!r}") from None
    return default_members(ws, ds)


@app.command()
def pretrain(
    samples: Path = typer.Option(..., "--samples", "-s", help="Sample table, .csv or .parquet: 9 km (SMAP truth) or 50 m (in-situ truth)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output weights directory."),
    epochs: int = typer.Option(30, min=1, help="Epochs (passes over the samples)."),
    lr: float = typer.Option(_TRAIN.lr, help="Adam learning rate."),
    batch: int = typer.Option(_TRAIN.batch, min=2, help="Samples per step."),
    average_last: int = typer.Option(_TRAIN.average_last, min=1, help="Average the weights of the last epochs."),
    widths: str = typer.Option("8,16,32,64,128", help="Comma-separated member widths w."),
    depths: str = typer.Option("1,2,3,4,5", help="Comma-separated member depths d."),
    seed: int = typer.Option(0, help="Seed of the initialisation, batches and dropout."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training step."),
    parts: int = typer.Option(0, "--parts", min=0, help="Train the members in this many parts side by side (CPU threads); 0: automatic."),
    schema: Optional[Path] = SchemaOpt,
    arch: Optional[Path] = ArchOpt,
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop rows with NaN features instead of failing."),
    force: bool = ForceOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Train a DenseSM-E from scratch on a sample table: 9 km samples with SMAP truth (standing in
    for the authors' pretrained weights), or 50 m samples with in-situ truth when you have
    stations but no 9 km data (then adapt needs none either: --method finetune or da)."""
    _threads(threads)
    from msda.adapt import pretrain as run_pretrain
    from msda.tables import read_samples
    from msda.transfer import TrainSettings

    _out(out, "weights", samples, schema, arch, force=force)
    specs = _members(widths, depths)
    spec = _arch(arch)
    coarse = read_samples(samples, None, None if schema is None else _schema(schema), drop_nan)
    settings = TrainSettings(epochs=epochs, lr=lr, batch=batch, average_last=min(average_last, epochs), seed=seed,
                             device=device, compile=compile, parts=parts)
    res = run_pretrain(coarse, out, settings, specs, force=force, arch=spec)
    last = [r for r in res.losses if r["epoch"] == epochs]
    mse = sum(r["fine_50m"] for r in last) / len(last)
    typer.echo(f"wrote {out}: {len(last)} members, {epochs} epochs on {len(coarse)} samples in {res.seconds:.1f} s "
               f"({res.device}); last-epoch training RMSE (member mean) {mse ** 0.5:.4f} m3/m3")


@app.command()
def adapt(
    weights: Path = typer.Option(..., "--weights", "-w", help="Pretrained weights (ours or the authors' .pt)."),
    fine: Path = typer.Option(..., "--fine", help="50 m sample table (in-situ truth)."),
    coarse: Optional[Path] = typer.Option(None, "--coarse", help="9 km sample table (SMAP truth); ms and msda need it."),
    method: str = typer.Option("msda", help="finetune, ms, da or msda."),
    network: str = typer.Option(..., "--network", help="Network to adapt to (e.g. SCAN)."),
    stations: Optional[int] = typer.Option(None, "--stations", help="Number of training stations, drawn with --seed."),
    station_list: Optional[Path] = typer.Option(None, "--station-list", help="File of training station names."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the 50 m term (ms, msda; default 0.7)."),
    beta: Optional[str] = typer.Option(None, help="Weight of the domain term: auto (Eq. 4) or a number (da, msda)."),
    epochs: int = typer.Option(_TRAIN.epochs, min=1, help="Epochs (passes over the labeled 50 m samples)."),
    lr: float = typer.Option(_TRAIN.lr, help="Adam learning rate."),
    batch: int = typer.Option(_TRAIN.batch, min=2, help="Samples per step from each stream."),
    average_last: int = typer.Option(_TRAIN.average_last, min=1, help="Average the weights of the last epochs."),
    domain_loss: str = typer.Option(_LOSS.domain_loss, "--domain-loss", help="coral or mmd."),
    monitor_every: int = typer.Option(0, "--monitor-every", min=0,
                                      help="Every N epochs, log the target RMSE to losses.csv (0: never)."),
    seed: int = typer.Option(0, help="Seed of the station draw, batches and dropout."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training step."),
    parts: int = typer.Option(0, "--parts", min=0, help="Train the members in this many parts side by side (CPU threads); 0: automatic."),
    schema: Optional[Path] = SchemaOpt,
    force: bool = ForceOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Adapt a pretrained DenseSM-E to a network's 50 m grid (finetune, MS, DA or MSDA)."""
    _threads(threads)
    from msda.adapt import adapt as run_adapt, read_station_list
    from msda.tables import read_samples
    from msda.transfer import TrainSettings
    from msda.weights import load_ensemble

    if (stations is None) == (station_list is None):
        raise MsdaError("give exactly one of --stations N or --station-list FILE")
    if coarse is None and method.lower() in ("ms", "msda"):
        raise MsdaError(f"--method {method} learns from 9 km samples too: give --coarse (finetune and da need none)")
    _out(out, "adaptation", weights, fine, coarse, station_list, schema, force=force)
    chosen = read_station_list(station_list) if station_list is not None else stations
    beta_value: float | str | None = beta
    if beta is not None and beta != "auto":
        try:
            beta_value = float(beta)
        except ValueError:
            raise MsdaError(f"--beta must be 'auto' or a number, got {beta!r}") from None
    ensemble = load_ensemble(weights)
    sch = ensemble.schema if schema is None else _schema(schema)
    fine_s = read_samples(fine, "fine", sch)
    coarse_s = read_samples(coarse, "coarse", sch) if coarse is not None else None
    settings = TrainSettings(epochs=epochs, lr=lr, batch=batch, average_last=min(average_last, epochs), seed=seed,
                             device=device, compile=compile, parts=parts)
    res, metrics = run_adapt(ensemble, fine_s, coarse_s, network, chosen, method.lower(), out, settings,
                             alpha, beta_value, domain_loss, monitor_every=monitor_every, force=force)
    typer.echo(f"wrote {out}: {method} on {network}, {len(ensemble.specs)} members, {epochs} epochs in "
               f"{res.seconds:.1f} s ({res.device})")
    typer.echo("target stations (transductive):")
    typer.echo(metrics.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _list(text: Optional[str], kind, what: str):
    if text is None:
        return None
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise MsdaError(f"--{what}: expected a comma-separated list of numbers, got {text!r}") from None


@app.command()
def experiment(
    fine: Path = typer.Option(..., "--fine", help="50 m sample table (in-situ truth, several networks)."),
    coarse: Path = typer.Option(..., "--coarse", help="9 km sample table (SMAP truth)."),
    weights: Path = typer.Option(..., "--weights", "-w", help="Pretrained weights (ours or the authors' .pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (resumed if it exists)."),
    network: str = typer.Option("SCAN", "--network", help="Network adapted to (transductive); others: inductive."),
    ns: Optional[str] = typer.Option(None, "--ns", help="Training station counts, e.g. 1,5,9 (default the paper's)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Random station draws per N (default 10)."),
    methods: Optional[str] = typer.Option(None, "--methods",
                                          help="Subset of pretrained,finetune,ms,da,msda (default all)."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Alpha values for ms/msda, e.g. 0.5,0.7,0.9."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs per fit (default 50)."),
    members: Optional[str] = typer.Option(None, "--members", help="Member names to use, e.g. m_1_8,m_2_16 (default all)."),
    domain_loss: str = typer.Option(_LOSS.domain_loss, "--domain-loss", help="coral or mmd."),
    quick: bool = typer.Option(False, "--quick", help="Demo protocol: 5 members, 8 epochs, N 1,5,21, 3 repeats."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Dask scheduler address; default a local cluster; 'inline': no Dask."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Local cluster workers (default 1)."),
    seed: int = typer.Option(0, help="Base seed of the station draws and fits."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (on the workers)."),
    schema: Optional[Path] = SchemaOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Run the paper's evaluation: N x repeats x methods x alpha, statistics, figures, HTML report."""
    _threads(threads)
    from msda.experiment import Inputs, Protocol, run_experiment

    _scheduler(scheduler)
    _out(out, "experiment", fine, coarse, weights, schema)
    changes = {k: v for k, v in {
        "network": network, "ns": _list(ns, int, "ns"), "repeats": repeats,
        "methods": _list(methods, str.lower, "methods") if methods else None,
        "alphas": _list(alphas, float, "alphas"), "epochs": epochs, "domain_loss": domain_loss, "seed": seed,
        "members": tuple(m.strip() for m in members.split(",") if m.strip()) if members else None,
    }.items() if v is not None}
    if epochs is not None:
        changes["average_last"] = min(10, epochs)
    protocol = Protocol.quick_run(**changes) if quick else Protocol.make(**changes)
    inputs = Inputs(str(fine), str(coarse), str(weights), str(schema) if schema else None)
    tables = run_experiment(inputs, out, protocol, scheduler=scheduler, workers=workers, device=device)
    med = tables["median"]
    if not med.empty:
        wide = med.pivot_table(index="variant", columns="n", values="rmse")
        typer.echo("median-run RMSE on the target stations (m3/m3):")
        typer.echo(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"wrote {out}/report.html and {out}/results/")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory of msda experiment."),
) -> None:
    """Re-score the finished fits of an experiment and rewrite its tables, figures and report."""
    from msda.experiment import rescore

    _, target = rescore(run_dir)
    typer.echo(f"wrote {target}")


@prepare_app.command("ismn")
def prepare_ismn(
    input: Path = typer.Option(..., "--input", "-i", help="ISMN download: zip or folder (either ISMN format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: stations.parquet, daily.parquet."),
    networks: Optional[str] = typer.Option(None, "--networks", help="Comma-separated networks (default all)."),
    flags: str = typer.Option("G", "--flags", help="Quality flags to keep: letters (G,U,D,C,M) or codes (D03)."),
    max_depth: float = typer.Option(0.05, "--max-depth", help="Deepest sensor bottom counted as surface (m)."),
    tolerance: float = typer.Option(0.0051, "--tolerance", help="Added to --max-depth (m); 2-inch probes count."),
    meta_cache: Optional[Path] = typer.Option(None, "--meta-cache", help="Keep the ismn package's metadata here."),
    force: bool = ForceOpt,
) -> None:
    """ISMN stations -> a station table (with EASE-2 9 km and 50 m cells) and daily surface soil moisture."""
    from msda.prepare.ismn import read_ismn, write_ismn

    _out(out, "ismn", input, meta_cache, force=force)
    nets = [n for n in networks.split(",") if n.strip()] if networks else None
    tables = read_ismn(input, nets, flags.split(","), max_depth, tolerance, meta_cache)
    write_ismn(tables, out, force=force)
    st = tables.stations
    typer.echo(f"wrote {out}: {len(st)} stations ({', '.join(f'{k} {v}' for k, v in st['network'].value_counts().sort_index().items())}), "
               f"{len(tables.daily)} station-days, {tables.daily['date'].min():%Y-%m-%d} to {tables.daily['date'].max():%Y-%m-%d}")


@prepare_app.command("smap")
def prepare_smap(
    input: Path = typer.Option(..., "--input", "-i", help="Folder of SPL3SMP_E .h5 files (one per day), or one file."),
    stations: Path = typer.Option(..., "--stations", help="Station table with 9 km 'r', 'c' (prepare ismn's stations.parquet or a CSV)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output Parquet: network, station, r, c, date, AM, PM, daily SMAP."),
    all_quality: bool = typer.Option(False, "--all-quality", help="Keep retrievals not of recommended quality."),
    force: bool = ForceOpt,
) -> None:
    """SMAP L3 enhanced 9 km at the stations' cells: AM, PM corrected to AM, daily mean."""
    from msda.prepare.rasters import write_table
    from msda.prepare.samples import read_table
    from msda.prepare.smap import smap_at_stations

    _out(out, "smap", input, stations, force=force)
    st = read_table(stations, "station", ("r", "c"))  # the 9 km EASE-2 row and column
    table = smap_at_stations(input, st, recommended_only=not all_quality)
    write_table(table, out, "smap", inputs=(input, stations), force=force)
    typer.echo(f"wrote {out}: {len(table)} station-days of SMAP for {table[['r', 'c']].drop_duplicates().shape[0]} 9 km cells")


@prepare_app.command("samples")
def prepare_samples(
    sar: Path = typer.Option(..., "--sar", help="Sentinel-1 per site: network, station, date, vv, vh, angle."),
    daily: Path = typer.Option(..., "--daily", help="Daily series per site: network, station, date, ndvi, t2m, tp."),
    static: Path = typer.Option(..., "--static", help="Static inputs per site (sand, clay, bulk_density, ...)."),
    stations: Path = typer.Option(..., "--stations", help="Station table with 9 km r, c (prepare ismn)."),
    truth: Path = typer.Option(..., "--truth", help="Daily truth: network, station, date, sm_m3m3."),
    out: Path = typer.Option(..., "--out", "-o", help="Sample table (.parquet ours, .csv the authors')."),
    kind: str = typer.Option("fine", help="fine (in-situ truth, 50 m) or coarse (SMAP truth, 9 km)."),
    min_dates: int = typer.Option(6, "--min-dates", min=1, help="Keep stations with at least this many coincident dates."),
    schema: Optional[Path] = SchemaOpt,
    drop_nan: bool = typer.Option(False, "--drop-nan", help="Drop samples whose series keep a gap longer than 2 steps (default: an error)."),
    force: bool = ForceOpt,
) -> None:
    """Per-site time series (e.g. Earth Engine exports) -> a validated sample table for adapt/experiment."""
    from msda.prepare.samples import build_samples, read_table
    from msda.tables import write_samples

    if kind not in ("fine", "coarse"):
        raise MsdaError(f"--kind must be fine or coarse, got {kind!r}")
    _out(out, "samples", sar, daily, static, stations, truth, schema, force=force)
    tables = [read_table(p, what) for p, what in ((sar, "sar"), (daily, "daily"), (static, "static"),
                                                   (stations, "stations"), (truth, "truth"))]
    samples = build_samples(*tables, kind=kind, schema=_schema(schema), min_dates=min_dates, drop_nan=drop_nan)
    if samples.dropped_nan:
        typer.echo(f"dropped {samples.dropped_nan} samples whose series keep a gap longer than 2 steps")
    write_samples(samples, out, force=force)
    f = samples.frame
    typer.echo(f"wrote {out}: {len(f)} {kind} samples at {f['station'].nunique()} stations "
               f"({f['date'].min():%Y-%m-%d} to {f['date'].max():%Y-%m-%d})")


@prepare_app.command("static")
def prepare_static(
    stations: Path = typer.Option(..., "--stations", help="Station table with network, station, lon, lat."),
    raster: list[str] = typer.Option(..., "--raster", help="NAME=FILE[:angle][:bandN], repeatable, e.g. aspect_deg=aspect.tif:angle."),
    out: Path = typer.Option(..., "--out", "-o", help="Static table (.parquet or .csv) for prepare samples."),
    grid: str = typer.Option("50m", "--grid", help="EASE-2 grid of the cells: 50m, 1km, 3km, 9km, 36km."),
    force: bool = ForceOpt,
) -> None:
    """Area-weighted aggregation of rasters (SoilGrids, SRTM, ...) on the stations' EASE-2 cells."""
    from msda.prepare.rasters import parse_static_spec, static_at_stations, write_table
    from msda.prepare.samples import STATION_COLUMNS, read_table

    sources = (stations, *(parse_static_spec(s)[1] for s in raster))
    _out(out, "static", *sources, force=force)
    table = static_at_stations(read_table(stations, "stations", STATION_COLUMNS), raster, grid)
    write_table(table, out, "static", inputs=sources, force=force)
    typer.echo(f"wrote {out}: {len(table)} stations x {len(raster)} inputs on the {grid} grid")


@prepare_app.command("series")
def prepare_series(
    stations: Path = typer.Option(..., "--stations", help="Station table with network, station, lon, lat."),
    raster: list[str] = typer.Option(..., "--raster", help="NAME=GLOB of dated rasters, repeatable, e.g. vv='s1/*VV*.tif'."),
    out: Path = typer.Option(..., "--out", "-o", help="Table network, station, date, NAME... (.parquet or .csv)."),
    grid: str = typer.Option("50m", "--grid", help="EASE-2 grid of the cells: 50m, 1km, 3km, 9km, 36km."),
    force: bool = ForceOpt,
) -> None:
    """Dated rasters (date in the file name) -> per-station time series, e.g. the sar or daily table."""
    import glob

    from msda.prepare.rasters import series_at_stations, write_table
    from msda.prepare.samples import STATION_COLUMNS, read_table

    sources = [stations, *(f for s in raster for f in glob.glob(s.partition("=")[2]))]
    _out(out, "series", *sources, force=force)
    st = read_table(stations, "stations", STATION_COLUMNS)
    table = series_at_stations(st, raster, grid)  # a pattern that matches nothing: one error, before any raster is read
    write_table(table, out, "series", inputs=sources, force=force)
    typer.echo(f"wrote {out}: {len(table)} station-dates of {', '.join(c for c in table.columns[3:])}")


@prepare_app.command("gee")
def prepare_gee(
    stations: Path = typer.Option(..., "--stations", help="Station table with network, station, lon, lat."),
    start: str = typer.Option(..., "--start", help="First Sentinel-1 date, YYYY-MM-DD."),
    end: str = typer.Option(..., "--end", help="Last Sentinel-1 date, YYYY-MM-DD."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: sar.parquet, daily.parquet, static.parquet."),
    project: Optional[str] = typer.Option(None, "--project", help="Earth Engine cloud project."),
    grid: str = typer.Option("50m", "--grid", help="EASE-2 cells to reduce over: 50m or 9km."),
    force: bool = ForceOpt,
) -> None:
    """Earth Engine per-site inputs (needs msda[gee] and an account) for msda prepare samples."""
    from msda.io import atomic_path
    from msda.prepare import earthengine as gee
    from msda.prepare.samples import STATION_COLUMNS, read_table

    _out(out, "gee", stations, force=force)
    st = read_table(stations, "stations", STATION_COLUMNS)
    gee.initialise(project)
    first, last = gee.default_period(start, end)
    tables = {"sar": gee.sentinel1(st, start, last, grid), "daily": gee.daily_series(st, first, last, grid),
              "static": gee.static_inputs(st, grid)}
    with atomic_path(out, "gee", inputs=(stations,), force=force) as tmp:
        tmp.mkdir()
        for name, table in tables.items():
            table.to_parquet(tmp / f"{name}.parquet", index=False)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {len(v)} rows" for k, v in tables.items()))


def _cells(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MsdaError(f"--cells must look like 2x2 (rows x columns of 9 km cells), got {text!r}") from None
    return rows, cols


@app.command()
def scene(
    out: Path = typer.Option(..., "--out", "-o", help="Output .zarr store or .nc file."),
    cells: str = typer.Option("2x2", help="Rows x columns of 9 km cells (180 x 180 pixels of 50 m each)."),
    dates: int = typer.Option(3, min=1, help="Sentinel-1 dates, 12 days apart."),
    start: str = typer.Option("2020-06-01", help="First date."),
    lon: float = typer.Option(-97.5, help="Longitude inside the first (north-west) 9 km cell."),
    lat: float = typer.Option(36.6, help="Latitude inside the first 9 km cell."),
    seed: int = typer.Option(0, help="Seed."),
    force: bool = ForceOpt,
) -> None:
    """Generate a synthetic 50 m input scene (the schema's variables, true soil moisture) for msda map."""
    from msda.simulate.scene import simulate_scene, write_scene

    _out(out, "scene", force=force)
    t0 = time.perf_counter()
    ds = simulate_scene(cells=_cells(cells), dates=dates, lon=lon, lat=lat, start=start, seed=seed)
    write_scene(ds, out, force=force)
    typer.echo(f"wrote {out}: {ds.sizes['time']} dates x {ds.sizes['y']} x {ds.sizes['x']} pixels of 50 m "
               f"in {time.perf_counter() - t0:.1f} s")


@app.command("map")
def map_(
    weights: Path = typer.Option(..., "--weights", "-w", help="Weights directory (ours or the authors' .pt files)."),
    inputs: str = typer.Option(..., "--inputs", "-i", help="Zarr/NetCDF cube, folder of GeoTIFFs, or 'demo'."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    chunks: int = typer.Option(256, min=16, help="Block side in pixels: one task per block and date."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a Dask scheduler (default: local threads)."),
    workers: Optional[int] = typer.Option(
        None, min=1, help="Local threads; default 1 on CPU (memory stays flat), 2 on a GPU (reading overlaps predicting)."
    ),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    training_table: Optional[Path] = typer.Option(None, "--training-table", help="Sample table whose feature ranges flag out-of-domain pixels (mask bit 4)."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Keep the raw ensemble mean (default: clipped to [0, truth_max], mask bit 8)."),
    cog: bool = typer.Option(True, "--cog/--no-cog", help="Write Cloud-Optimized GeoTIFFs besides the Zarr store."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Draw a PNG per date."),
    cells: str = typer.Option("2x2", help="With --inputs demo: rows x columns of 9 km cells."),
    dates: int = typer.Option(3, min=1, help="With --inputs demo: Sentinel-1 dates."),
    seed: int = typer.Option(0, help="With --inputs demo: seed of the scene."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the PyTorch convolutions (for GPUs)."),
    force: bool = ForceOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Map 50 m soil moisture: ensemble mean, member spread and a mask per date (Zarr, COG, PNG)."""
    _threads(threads)
    from msda.mapping import make_map

    _scheduler(scheduler)
    _out(out, "map", weights, None if inputs == "demo" else inputs, training_table, force=force)
    scene_opts = dict(cells=_cells(cells), dates=dates, seed=seed) if inputs == "demo" else None
    s = make_map(weights, inputs, out, chunks=chunks, scheduler=scheduler, workers=workers, device=device,
                 ranges_table=training_table, previews=preview, cog=cog, scene=scene_opts,
                 compile=compile, force=force, clip=not no_clip)
    h, w = s["shape"][1:]
    typer.echo(f"wrote {out}: {len(s['dates'])} dates x {h} x {w} pixels, {s['pixels_per_s']:,.0f} pixels/s")
    for d in s["dates"]:
        line = (f"  {d['date']}: mean {d['mean_sm']:.3f} m3/m3, spread {d['mean_std']:.3f}; "
                f"{d['nodata']} nodata, {d['out_of_range']} out of range") if d["predicted"] else f"  {d['date']}: nothing predicted"
        typer.echo(line)
    for d in s.get("versus_truth", []):
        typer.echo(f"  {d['date']} against the scene's truth: RMSE {d['rmse']:.3f}, R {d['r']:.2f}, bias {d['bias']:+.3f}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output directory."),
    scale: float = typer.Option(1.0, help="Benchmark size as a fraction of Table 2."),
    seed: int = typer.Option(0, help="Seed."),
    pretrain_epochs: int = typer.Option(2, min=1, help="Epochs of the quick 9 km pretraining."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address; 'inline': no Dask."),
    threads: int = ThreadsOpt,
) -> None:
    """Run the main job on the embedded default data: benchmark, pretraining, quick experiment, report."""
    _threads(threads)
    from msda.demo import run_demo

    _scheduler(scheduler)
    run_demo(out, scale=scale, seed=seed, echo=typer.echo, pretrain_epochs=pretrain_epochs, scheduler=scheduler)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: unwinds like KeyboardInterrupt (temporaries removed, workers closed)
    up to :func:`run`, past the command-line parser's own handling of KeyboardInterrupt."""


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _one_line(exc: BaseException) -> tuple[str, int]:
    """The error line and exit status of what stopped a command."""
    if isinstance(exc, Interrupted):
        return "interrupted; no partial output left (msda experiment keeps its finished fits)", 130
    if isinstance(exc, OSError):  # the machine's answer (disk full, permissions): the file named
        return (f"{exc.filename}: " if exc.filename else "") + str(exc.strerror or exc), 2
    if isinstance(exc, MemoryError):
        return "out of memory; use smaller --batch, --chunk-rows or --chunks", 2
    return str(exc), 2


def run() -> None:
    """Entry point: one line per user error (exit 2), full traceback with --debug; Ctrl-C and
    SIGTERM stop the command (exit 130) with nothing half-written left behind."""
    import signal

    # also where a shell started msda as a background job, with SIGINT ignored
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except (MsdaError, Interrupted, OSError, MemoryError) as exc:
        if _state["debug"]:
            raise
        line, status = _one_line(exc)
        typer.echo(f"error: {line}", err=True)
        sys.exit(status)


if __name__ == "__main__":
    run()
