"""Probes of bad or unlucky input, as a new user would try them (issue: nothing lost, nothing
silently wrong). Every CLI probe must end in one ``error:`` line with exit 2 and leave the
workspace exactly as it was: no file lost, changed or left behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_frame, run_cli
from safetensors.torch import load_file, save_file

from msda.errors import MsdaError
from msda.experiment import ExperimentError, Inputs, Protocol, Task, rescore, run_experiment
from msda.io import MARKER, atomic_path, output_kind
from msda.network.model import DenseSME, MemberSpec
from msda.simulate import SimConfig, simulate, write_benchmark
from msda.tables import samples_from_frame, write_samples
from msda.weights import save_authors, save_ensemble

SPECS = [MemberSpec(1, 8), MemberSpec(2, 8)]


# ----- a workspace: a small benchmark, weights, and things msda did not write -----------------
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("source")
    bench = simulate(SimConfig(scale=0.03, seed=5, networks=("SCAN", "USCRN"), pretrain_cells=30))
    write_benchmark(bench, d / "bench")
    save_ensemble(DenseSME(SPECS, seed=0), d / "w")
    save_authors(DenseSME(SPECS, seed=0), d / "pt")
    (d / "notes").mkdir()
    (d / "notes" / "thesis.txt").write_text("three years of work\n")
    (d / "notes.txt").write_text("my notes\n")
    pd.DataFrame({"a": [1, 2]}).to_parquet(d / "mine.parquet")
    (d / "sub").mkdir()
    (d / "home").mkdir()
    (d / "home" / ".bashrc").write_text("# mine\n")
    return d


@pytest.fixture
def ws(source, tmp_path, monkeypatch) -> Path:
    d = tmp_path / "ws"
    shutil.copytree(source, d, symlinks=True)
    monkeypatch.chdir(d)
    monkeypatch.setenv("HOME", str(d / "home"))
    return d


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root with its content hash (caches that $HOME gathers aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if ".cache" not in p.relative_to(root).parts}


def one_line(code, err, *needles) -> str:
    """Exit 2 and one ``error:`` line, last (progress bars before it are output, not errors)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


# ----- bad inputs written into the workspace ----------------------------------------------------
def _weights_with(ws: Path, name: str, edit_tensors=None, edit_manifest=None) -> str:
    d = ws / name
    shutil.copytree(ws / "w", d)
    if edit_tensors:
        t = load_file(str(d / "weights.safetensors"))
        edit_tensors(t)
        save_file(t, str(d / "weights.safetensors"))
    if edit_manifest:
        m = json.loads((d / "manifest.json").read_text())
        m = edit_manifest(m)
        (d / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return name


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


def _member(field, value):
    def edit(m):
        m["members"][0][field] = value
        return m
    return edit


def _table_with(ws: Path, name: str, edit) -> str:
    frame = pd.read_parquet(ws / "bench" / "fine.parquet")
    table = pa.Table.from_pandas(edit(frame.copy()), preserve_index=False)
    meta = pq.read_schema(ws / "bench" / "fine.parquet").metadata
    pq.write_table(table.replace_schema_metadata(meta), ws / name)
    return name


def _raw_meta(ws: Path, name: str, value: bytes) -> str:
    table = pq.read_table(ws / "bench" / "fine.parquet")
    pq.write_table(table.replace_schema_metadata({b"msda": value}), ws / name)
    return name


def _cell(col, row, value):
    def edit(f):
        f[col] = f[col].astype(object) if isinstance(value, str) else f[col]
        f.loc[row, col] = value
        return f
    return edit


def _schema(ws: Path, name: str, text: str) -> str:
    (ws / name).write_text(text)
    return name


def _samples_table(ws: Path) -> str:
    write_samples(samples_from_frame(make_frame("fine"), "fine"), ws / "pred.parquet")
    return "pred.parquet"


def _overflowing_weights(ws: Path) -> str:
    e = DenseSME(SPECS, seed=0)
    with torch.no_grad():
        e.members[1].out.weight.fill_(3e38)
    save_ensemble(e, ws / "w_overflow")
    return "w_overflow"


def _evil_pickle(ws: Path) -> str:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ws / 'PWNED'}",))

    (ws / "evil").mkdir()
    with open(ws / "evil" / "DenseSM_1_8.pt", "wb") as fh:
        pickle.dump({"out.weight": Payload()}, fh, protocol=2)
    return "evil"


P = "bench/pretrain.parquet"
F = "bench/fine.parquet"
C = "bench/coarse.parquet"
MAP = ["map", "--weights", "w", "--inputs", "demo", "--cells", "1x1", "--dates", "1"]

# (id, setup(ws) -> dict of names, args with {names}, expected words in the error line)
CLI_PROBES = [
    # 1. never destroy what msda did not write
    ("init-over-cwd", None, ["weights", "init", "--out", "."], ["working directory"]),
    ("init-over-cwd-force", None, ["weights", "init", "--out", ".", "--force"], ["working directory"]),
    ("init-over-ancestor", "sub", ["weights", "init", "--out", ".."], ["ancestor of the working directory"]),
    ("init-over-home", None, ["weights", "init", "--out", "{home}", "--force"], ["home directory"]),
    ("init-over-foreign-folder", None, ["weights", "init", "--out", "notes"], ["did not write", "--force"]),
    ("init-over-foreign-file", None, ["weights", "init", "--out", "notes.txt"], ["did not write"]),
    ("pretrain-over-its-tables", None, ["pretrain", "--samples", P, "--out", "bench"], ["holds the input"]),
    ("pretrain-over-its-tables-force", None, ["pretrain", "--samples", P, "--out", "bench", "--force"], ["holds the input"]),
    ("predict-over-its-input", None, ["predict", "-w", "w", "-s", F, "-o", F], ["is the input"]),
    ("predict-over-the-weights", None, ["predict", "-w", "w", "-s", F, "-o", "w", "--force"], ["is the input"]),
    ("predict-over-foreign-parquet", None, ["predict", "-w", "w", "-s", F, "-o", "mine.parquet"], ["did not write"]),
    ("predict-over-msda-samples", {"t": _samples_table}, ["predict", "-w", "w", "-s", F, "-o", "{t}"],
     ["msda samples output, not predictions"]),
    ("predict-over-a-link", {"l": lambda ws: (os.symlink(ws / "mine.parquet", ws / "link.parquet"), "link.parquet")[1]},
     ["predict", "-w", "w", "-s", F, "-o", "{l}"], ["did not write"]),
    ("predict-over-a-dangling-link", {"l": lambda ws: (os.symlink(ws / "gone.parquet", ws / "link.parquet"), "link.parquet")[1]},
     ["predict", "-w", "w", "-s", F, "-o", "{l}"], ["did not write"]),
    ("convert-over-its-input", None, ["convert", F, F], ["is the input"]),
    ("convert-over-foreign", None, ["convert", F, "mine.parquet"], ["did not write"]),
    ("weights-convert-over-source", None, ["weights", "convert", "pt", "pt", "--force"], ["is the input"]),
    ("weights-convert-over-foreign", None, ["weights", "convert", "pt", "notes"], ["did not write"]),
    ("simulate-over-foreign", None, ["simulate", "--out", "notes", "--scale", "0.01"], ["did not write"]),
    ("simulate-over-cwd", None, ["simulate", "--out", ".", "--scale", "0.01", "--force"], ["working directory"]),
    ("scene-over-foreign", None, ["scene", "--out", "notes.txt"], ["did not write"]),
    ("schema-write-over-foreign", {"s": lambda ws: ((ws / "mine.yaml").write_text("a: 1\n"), "mine.yaml")[1]},
     ["schema", "write", "{s}"], ["did not write"]),
    ("schema-write-unknown-format", None, ["schema", "write", "notes.txt"], ["ends in .toml, .yaml, .yml or .json"]),
    ("map-over-foreign", None, [*MAP, "--out", "notes"], ["did not write"]),
    ("map-over-its-weights", None, [*MAP, "--out", "w", "--force"], ["is the input"]),
    ("adapt-over-its-tables", None, ["adapt", "-w", "w", "--fine", F, "--coarse", C, "--network", "SCAN",
                                     "--stations", "1", "--out", "bench"], ["holds the input"]),
    ("experiment-over-foreign", None, ["experiment", "--fine", F, "--coarse", C, "--weights", "w", "--out", "notes"],
     ["did not write"]),
    ("experiment-over-inputs", None, ["experiment", "--fine", F, "--coarse", C, "--weights", "w", "--out", "bench"],
     ["holds the input"]),
    ("prepare-static-over-foreign", None, ["prepare", "static", "--stations", "bench/stations.csv", "--raster",
                                           "sand=x.tif", "--out", "mine.parquet"], ["did not write"]),
    ("prepare-smap-over-stations", None, ["prepare", "smap", "--input", "x", "--stations", "bench/stations.csv",
                                          "--out", "bench/stations.csv", "--force"], ["is the input"]),
    # 4. finite and bounded, checked at the edge: weights
    ("weights-nan", {"w": lambda ws: _weights_with(ws, "w_nan", _set("m_1_8.out.weight", lambda v: v * np.nan))},
     ["weights", "info", "{w}"], ["m_1_8", "non-finite"]),
    ("weights-inf", {"w": lambda ws: _weights_with(ws, "w_inf", _set("m_2_8.norm.running_var", lambda v: v / 0))},
     ["weights", "info", "{w}"], ["m_2_8", "non-finite"]),
    ("weights-int-dtype", {"w": lambda ws: _weights_with(ws, "w_int", _set("m_1_8.out.weight", lambda v: v.to(torch.int32)))},
     ["weights", "info", "{w}"], ["int32", "floating point"]),
    ("weights-format-version", {"w": lambda ws: _weights_with(ws, "w_v2", edit_manifest=lambda m: {**m, "format_version": 2})},
     ["weights", "info", "{w}"], ["format_version 2"]),
    ("weights-depth-fraction", {"w": lambda ws: _weights_with(ws, "w_frac", edit_manifest=_member("depth", 1.5))},
     ["weights", "info", "{w}"], ["depth must be a whole number"]),
    ("weights-depth-string", {"w": lambda ws: _weights_with(ws, "w_str", edit_manifest=_member("depth", "1"))},
     ["weights", "info", "{w}"], ["depth must be a whole number"]),
    ("weights-width-huge", {"w": lambda ws: _weights_with(ws, "w_huge", edit_manifest=_member("width", 99999))},
     ["weights", "info", "{w}"], ["width must lie in"]),
    ("weights-many-members", {"w": lambda ws: _weights_with(ws, "w_many", edit_manifest=lambda m: {
        **m, "members": [{"name": "x", "depth": 1, "width": 8}] * 100_000})},
     ["weights", "info", "{w}"], ["100000 members", "at most"]),
    ("weights-manifest-not-json", {"w": lambda ws: _weights_with(ws, "w_json", edit_manifest=lambda m: "{nope")},
     ["weights", "info", "{w}"], ["not valid JSON"]),
    ("weights-manifest-a-list", {"w": lambda ws: _weights_with(ws, "w_list", edit_manifest=lambda m: "[1, 2]")},
     ["weights", "info", "{w}"], ["not an msda weights manifest"]),
    ("weights-members-missing", {"w": lambda ws: _weights_with(ws, "w_nomem", edit_manifest=lambda m: {**m, "members": 3})},
     ["weights", "info", "{w}"], ["'members' must be"]),
    ("authors-file-huge", {"w": lambda ws: (shutil.copy(ws / "pt" / "DenseSM_1_8.pt", ws / "DenseSM_999_99999.pt"),
                                            "DenseSM_999_99999.pt")[1]},
     ["weights", "info", "{w}"], ["DenseSM_999_99999.pt", "member depth must lie in"]),
    ("authors-pickle-payload", {"w": _evil_pickle}, ["weights", "info", "{w}"], ["not a plain state dict", "do not trust"]),
    ("init-width-zero", None, ["weights", "init", "--out", "w0", "--widths", "0"], ["member width must lie in"]),
    ("init-width-fraction", None, ["weights", "init", "--out", "w0", "--widths", "2.5"], ["comma-separated integers"]),
    ("init-depth-huge", None, ["weights", "init", "--out", "w0", "--depths", "99999"], ["member depth must lie in"]),
    ("pretrain-width-negative", None, ["pretrain", "--samples", P, "--out", "w0", "--widths", "-3"], ["member width"]),
    # schemas
    ("schema-series-huge", {"s": lambda ws: _schema(ws, "s.yaml", "series:\n- {name: x, lo: 0, hi: 1, length: 1000000000}\n")},
     ["schema", "show", "{s}"], ["length must lie in"]),
    ("schema-series-fraction", {"s": lambda ws: _schema(ws, "s.yaml", "series:\n- {name: x, lo: 0, hi: 1, length: 4.5}\n")},
     ["schema", "show", "{s}"], ["whole number"]),
    ("schema-series-text", {"s": lambda ws: _schema(ws, "s.yaml", "series: abc\n")},
     ["schema", "show", "{s}"], ["list of tables"]),
    ("schema-not-text", {"s": lambda ws: (Path(ws / "s.toml").write_bytes(b"\xff\xfe\x00garbage"), "s.toml")[1]},
     ["schema", "show", "{s}"], ["s.toml"]),
    # tables
    ("table-inf", {"t": lambda ws: _table_with(ws, "t.parquet", _cell("vv", 3, np.inf))},
     ["validate", "{t}"], ["infinite", "vv", "rows 3"]),
    ("table-unnormalised", {"t": lambda ws: _table_with(ws, "t.parquet", _cell("vv", 7, -15.2))},
     ["validate", "{t}"], ["'vv'", "-15.2", "row 7", "normalised"]),
    ("table-negative-row", {"t": lambda ws: _table_with(ws, "t.parquet", _cell("r", 2, -4))},
     ["validate", "{t}"], ["'r'", "grid indices", "rows 2"]),
    ("table-column-beyond-grid", {"t": lambda ws: _table_with(ws, "t.parquet", _cell("c", 5, 5000))},
     ["validate", "{t}"], ["'c'", "[0, 3856)"]),
    ("table-bad-date", {"t": lambda ws: _table_with(ws, "t.parquet", lambda f: f.assign(date=f["date"].astype(str)).pipe(
        _cell("date", 4, "31/31/2020")))}, ["validate", "{t}"], ["'date'", "31/31/2020", "rows 4"]),
    ("table-metadata-not-json", {"t": lambda ws: _raw_meta(ws, "t.parquet", b"{broken")},
     ["validate", "{t}"], ["malformed msda metadata"]),
    ("table-metadata-schema-text", {"t": lambda ws: _raw_meta(ws, "t.parquet", b'{"schema": "x"}')},
     ["validate", "{t}"], ["malformed msda metadata"]),
    ("table-no-rows", {"t": lambda ws: _table_with(ws, "t.parquet", lambda f: f.iloc[:0])},
     ["validate", "{t}"], ["no rows"]),
    ("table-csv-no-rows", {"t": lambda ws: (pd.read_csv(write_samples(samples_from_frame(make_frame(), "fine"),
                                                                      ws / "a.csv")).iloc[:0].to_csv(ws / "a.csv"), "a.csv")[1]},
     ["validate", "{t}"], ["no rows"]),
    ("table-csv-edate-huge", {"t": lambda ws: (pd.read_csv(write_samples(samples_from_frame(make_frame(), "fine"), ws / "a.csv"))
                                               .assign(edate=1e12).to_csv(ws / "a.csv", index=False), "a.csv")[1]},
     ["validate", "{t}"], ["edate", "outside years"]),
    ("table-a-folder", {"t": lambda ws: ((ws / "x.csv").mkdir(), "x.csv")[1]}, ["validate", "{t}"], ["x.csv"]),
    ("table-garbage-parquet", {"t": lambda ws: ((ws / "g.parquet").write_bytes(os.urandom(300)), "g.parquet")[1]},
     ["validate", "{t}"], ["not a readable Parquet"]),
    ("prepare-samples-garbage", {"t": lambda ws: ((ws / "g.parquet").write_bytes(os.urandom(300)), "g.parquet")[1]},
     ["prepare", "samples", "--sar", "{t}", "--daily", "{t}", "--static", "{t}", "--stations", "{t}", "--truth", "{t}",
      "--out", "s.parquet"], ["g.parquet", "not a readable sar table"]),
    ("prepare-smap-empty-csv", {"t": lambda ws: ((ws / "e.csv").write_text(""), "e.csv")[1]},
     ["prepare", "smap", "--input", "x", "--stations", "{t}", "--out", "s.parquet"], ["e.csv", "not a readable"]),
    ("prepare-series-no-lon", {"t": lambda ws: (pd.DataFrame({"network": ["A"], "station": ["b"]}).to_csv(ws / "st.csv"),
                                                "st.csv")[1]},
     ["prepare", "series", "--stations", "{t}", "--raster", "vv=x*.tif", "--out", "s.parquet"], ["st.csv", "no column 'lon'"]),
    # predictions
    ("predict-non-finite", {"w": _overflowing_weights}, ["predict", "-w", "{w}", "-s", F, "-o", "p.parquet"],
     ["non-finite predictions", "m_2_8", "rows 0, 1, 2"]),
    # 5. every failure one line: devices, schedulers, run directories
    ("predict-device-gpu", None, ["predict", "-w", "w", "-s", F, "-o", "p.parquet", "--device", "gpu"], ["'gpu'", "not a device"]),
    ("predict-device-meta", None, ["predict", "-w", "w", "-s", F, "-o", "p.parquet", "--device", "meta"], ["cpu, cuda"]),
    ("experiment-scheduler-garbage", None, ["experiment", "--fine", F, "--coarse", C, "--weights", "w", "--out", "e",
                                            "--scheduler", "garbage"], ["not a Dask scheduler address"]),
    ("map-scheduler-http", None, [*MAP, "--out", "m", "--scheduler", "http://127.0.0.1:80"], ["unknown address scheme 'http'"]),
    ("map-scheduler-port", None, [*MAP, "--out", "m", "--scheduler", "tcp://127.0.0.1:99999"], ["port 99999"]),
    ("report-not-a-run", None, ["report", "notes"], ["no protocol.json"]),
    ("report-broken-record", {"d": lambda ws: ((ws / "r").mkdir(), (ws / "r" / "protocol.json").write_text("{"), "r")[2]},
     ["report", "{d}"], ["protocol.json", "unreadable"]),
]
if torch.cuda.is_available():  # pragma: no cover - the machines this suite runs on have no CUDA
    CLI_PROBES = [p for p in CLI_PROBES if "device" not in p[0]]


@pytest.mark.parametrize("probe", CLI_PROBES, ids=[p[0] for p in CLI_PROBES])
def test_cli_probe(probe, ws, capsys, monkeypatch):
    name, setup, args, needles = probe
    names = {"home": str(ws / "home")}
    if setup == "sub":
        monkeypatch.chdir(ws / "sub")
    elif setup:
        names.update({k: fn(ws) for k, fn in setup.items()})
    before = snapshot(ws)
    code, err = run_cli([a.format(**names) for a in args], capsys)
    one_line(code, err, *needles)
    assert snapshot(ws) == before, "the workspace changed"
    assert not (ws / "PWNED").exists()


# ----- replacing msda's own outputs -----------------------------------------------------------------
def test_same_kind_is_replaced_and_force_replaces_foreign(ws, capsys):
    code, _ = run_cli(["weights", "init", "--out", "w", "--widths", "16", "--depths", "1"], capsys)
    assert code is None or code == 0
    assert json.loads((ws / "w" / "manifest.json").read_text())["members"][0]["width"] == 16
    assert output_kind(ws / "w") == "weights"
    code, err = run_cli(["weights", "init", "--out", "notes", "--force"], capsys)
    assert code in (None, 0), err
    assert not (ws / "notes" / "thesis.txt").exists() and output_kind(ws / "notes") == "weights"
    (ws / "empty").mkdir()
    code, err = run_cli(["weights", "init", "--out", "empty"], capsys)  # an empty folder holds nothing to lose
    assert code in (None, 0), err
    assert sorted(p.name for p in ws.iterdir() if ".msda-" in p.name) == []  # no temporaries left


def test_a_failed_write_leaves_the_old_output_whole(ws):
    before = snapshot(ws / "w")
    with pytest.raises(RuntimeError), atomic_path(ws / "w", "weights") as tmp:
        tmp.mkdir()
        (tmp / "manifest.json").write_text("half")
        raise RuntimeError("killed by a bug")
    assert snapshot(ws / "w") == before
    assert [p.name for p in ws.iterdir() if ".msda-" in p.name] == []


def test_os_errors_are_one_line(ws, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    code, err = run_cli(["convert", "bench/fine.parquet", "out.parquet"], capsys)
    one_line(code, err, "out.parquet", "No space left on device")
    monkeypatch.undo()
    monkeypatch.chdir(ws)

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    code, err = run_cli(["weights", "init", "--out", "w2", "--widths", "8", "--depths", "1"], capsys)
    one_line(code, err, "w2", "Read-only file system")
    assert [p.name for p in ws.iterdir() if ".msda-" in p.name or p.name == "w2"] == []


def test_a_failed_swap_over_a_file_leaves_it_and_its_marker_as_they_were(ws, monkeypatch):
    before = snapshot(ws)
    real = os.replace
    calls = []

    def fail_the_swap(src, dst):
        calls.append(dst)
        if Path(dst).name == "mine.parquet":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_the_swap)
    with pytest.raises(MsdaError, match="mine.parquet: cannot write"):
        with atomic_path(ws / "mine.parquet", "predictions", force=True) as tmp:
            tmp.write_bytes(b"new")
    assert any(Path(c).name == ".mine.parquet.msda-output" for c in calls)  # the marker was written first
    assert snapshot(ws) == before  # the file, and no marker or temporary left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_tidied(ws):
    host = socket.gethostname().replace(".", "_")
    dead = _dead_pid()
    stale = ws / f".w.msda-tmp.{host}.{dead}.ab12cd34"
    stale.mkdir()
    (stale / "junk").write_text("x")
    live = ws / f".w.msda-tmp.{host}.{os.getpid()}.ffffffff"  # a run still going: left alone
    live.mkdir()
    other_host = ws / f".w.msda-tmp.elsewhere.{dead}.00000000"  # another machine's: left alone
    other_host.mkdir()
    save_ensemble(DenseSME(SPECS, seed=1), ws / "w")
    assert not stale.exists() and live.exists() and other_host.exists()

    # the fallback swap was killed between its two renames: the old folder comes back
    shutil.rmtree(ws / "w")
    old = ws / f".w.msda-old.{host}.{dead}.12345678"
    shutil.copytree(ws / "pt", old)
    (old / MARKER).write_text(json.dumps({"kind": "weights"}))
    save_ensemble(DenseSME(SPECS, seed=2), ws / "w2")  # another path: nothing to recover there
    assert old.exists()
    with atomic_path(ws / "w", "weights") as tmp:
        assert (ws / "w" / "DenseSM_1_8.pt").exists()  # restored before anything else
        tmp.mkdir()
        (tmp / "new").write_text("n")
    assert (ws / "w" / "new").exists() and not old.exists()


KILL_WRITER = """
import sys, time
from msda.io import atomic_path
with atomic_path(sys.argv[1], "weights") as tmp:
    tmp.mkdir()
    (tmp / "part").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_kill_leaves_the_old_output_and_the_next_run_tidies(ws):
    before = snapshot(ws / "w")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(ws / "w")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert snapshot(ws / "w") == before
    assert len([p for p in ws.iterdir() if ".msda-tmp." in p.name]) == 1
    save_ensemble(DenseSME(SPECS, seed=3), ws / "w")
    assert [p for p in ws.iterdir() if ".msda-tmp." in p.name] == []


# ----- experiment: resume only what is truly the same ---------------------------------------------
PROTO = dict(ns=(1,), repeats=1, methods=("pretrained", "finetune"), epochs=1, average_last=1, batch=64)


def _run(ws, out="run", protocol=None, **inputs):
    args = {"fine": str(ws / F), "coarse": str(ws / C), "weights": str(ws / "w"), **inputs}
    return run_experiment(Inputs(**args), ws / out, protocol or Protocol.make(**PROTO), scheduler="inline",
                          device="cpu", progress=False, report=False)


def test_resume_refuses_changed_inputs_and_accepts_moved_ones(ws):
    _run(ws)
    save_ensemble(DenseSME(SPECS, seed=9), ws / "w")  # other weights under the same path
    with pytest.raises(ExperimentError, match=r"inputs changed.*weights"):
        _run(ws)
    with pytest.raises(ExperimentError, match=r"inputs changed.*weights"):
        rescore(ws / "run")
    save_ensemble(DenseSME(SPECS, seed=0), ws / "w")  # the same model again (a new timestamp)
    frame = pd.read_parquet(ws / F)
    frame.loc[0, "sm_m3m3"] += 0.01  # a new truth under the same path
    write_samples(samples_from_frame(frame, "fine"), ws / F, force=True)  # a part of the benchmark folder
    with pytest.raises(ExperimentError, match=r"inputs changed.*fine"):
        _run(ws)
    with pytest.raises(ExperimentError, match=r"inputs changed.*fine"):
        rescore(ws / "run")
    shutil.copytree(ws / "bench", ws / "moved")  # back to the first table, under another path
    _run(ws, out="run2")
    shutil.copy(ws / "run2" / "protocol.json", ws / "moved" / "unused.json")
    t = _run(ws, out="run2", fine=str(ws / "moved" / "fine.parquet"), coarse=str(ws / "moved" / "coarse.parquet"))
    assert len(t["runs"]) == 2


def test_task_keys_keep_full_precision(ws):
    p = Protocol.make(**{**PROTO, "methods": ("ms",), "alphas": (0.701, 0.704)})
    keys = [t.key for t in p.tasks()]
    assert len(set(keys)) == 2 and Task(1, 0, "ms", 0.7).key == "n001_r00_ms_a0.7"
    t = _run(ws, protocol=p)
    assert sorted(t["runs"]["alpha"]) == [0.701, 0.704]
    with pytest.raises(ExperimentError, match="alpha 0.7 is given twice"):
        Protocol.make(**{**PROTO, "alphas": (0.7, 0.7)}).check()


def test_unreadable_task_files_are_redone(ws):
    _run(ws)
    tasks = sorted((ws / "run" / "tasks").glob("*.parquet"))
    tasks[0].write_bytes(b"")
    tasks[1].write_bytes(tasks[1].read_bytes()[:100])
    tables, _ = rescore(ws / "run")  # the report scores what can be read
    assert len(tables["runs"]) == 0
    t = _run(ws)
    assert len(t["runs"]) == 2 and all(pq.read_schema(p).metadata for p in tasks)


def test_one_process_per_run_directory(ws):
    import fcntl

    _run(ws)
    with open(ws / "run" / ".msda-lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ExperimentError, match="another msda process works in this run directory"):
            _run(ws)
        with pytest.raises(ExperimentError, match="another msda process"):
            rescore(ws / "run")
    _run(ws)  # free again


def test_a_run_without_fingerprints_is_not_resumed(ws):
    _run(ws)
    record = json.loads((ws / "run" / "protocol.json").read_text())
    del record["fingerprints"]
    (ws / "run" / "protocol.json").write_text(json.dumps(record))
    with pytest.raises(ExperimentError, match="without input fingerprints"):
        _run(ws)


# ----- names that are TeX or CSV specials ------------------------------------------------------------
def test_special_names_in_figures_and_report(ws):
    frame = pd.read_parquet(ws / F)
    odd = {s: f"{s}$\\oops{{$\\a,b" for s in frame["station"].unique()}  # an invalid TeX formula
    frame["station"] = frame["station"].map(odd)
    frame["network"] = frame["network"].replace({"USCRN": "US$CRN, $\\n{x"})
    write_samples(samples_from_frame(frame, "fine"), ws / "odd.parquet")
    out = ws / "odd_run"
    proto = Protocol.make(**{**PROTO, "ns": (2,)})
    run_experiment(Inputs(str(ws / "odd.parquet"), str(ws / C), str(ws / "w")), out, proto, scheduler="inline",
                   device="cpu", progress=False)
    assert (out / "report.html").stat().st_size > 10_000
    runs = pd.read_parquet(out / "results" / "runs.parquet")
    assert all(len(json.loads(s)) == 2 and all(t in odd.values() for t in json.loads(s)) for s in runs["train_stations"])
    assert len(list((out / "figures").glob("*.png"))) >= 5


# ----- interrupts and remote services -------------------------------------------------------------------
def _start(args, cwd, ignore_sigint=True):
    def child():
        os.setsid()
        if ignore_sigint:  # as a shell starts a background job
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", "msda.cli", *args], cwd=cwd, preexec_fn=child,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(proc, sig, wait_for=None, timeout=120):
    t0 = time.monotonic()
    while wait_for is not None and not wait_for() and time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.kill(proc.pid, sig)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - t0


def _no_children_left(sid: int) -> bool:
    """No process of the command's session still runs (zombies, already ended, aside)."""
    ps = subprocess.run(["ps", "-e", "-o", "sid=,stat=,args="], capture_output=True, text=True).stdout
    left = [line for line in ps.splitlines() if line.split()[0] == str(sid) and not line.split()[1].startswith("Z")]
    return not left


def test_ctrl_c_stops_experiment_keeps_finished_fits(ws):
    args = ["experiment", "--fine", F, "--coarse", C, "--weights", "w", "--out", "run", "--ns", "1,2",
            "--repeats", "30", "--methods", "finetune", "--epochs", "30", "--workers", "1"]
    proc = _start(args, ws)
    code, err, seconds = _stop(proc, signal.SIGINT, lambda: len(list((ws / "run" / "tasks").glob("*.parquet"))) >= 1)
    assert code == 130 and seconds < 30, (code, seconds, err)
    # after the line, multiprocessing's resource tracker may warn of semaphores of the workers
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: interrupted; no partial output left (msda experiment keeps its finished fits)"], err
    assert "Traceback" not in err
    done = list((ws / "run" / "tasks").glob("*.parquet"))
    assert 1 <= len(done) < 60 and all(pq.read_schema(p).metadata for p in done)
    time.sleep(1)
    assert _no_children_left(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_map_and_leaves_nothing(ws, sig):
    before = snapshot(ws)
    proc = _start([*MAP[:-4], "--cells", "4x4", "--dates", "4", "--out", "m"], ws)
    code, err, seconds = _stop(proc, sig, lambda: any(".m.msda-tmp." in p.name for p in ws.iterdir()))
    assert code == 130 and seconds < 30, (code, seconds, err)
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(ws) == before


def test_a_server_that_is_not_a_scheduler_fails_in_bounded_time(ws):
    server = socket.socket()  # accepts connections and never answers: not a Dask scheduler
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    conns = []
    threading.Thread(target=lambda: [conns.append(server.accept()) for _ in range(4)], daemon=True).start()
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        proc = subprocess.run([sys.executable, "-m", "msda.cli", *MAP, "--out", "m", "--scheduler", address],
                              cwd=ws, env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    one_line(proc.returncode, proc.stderr, "cannot reach a Dask scheduler", "2 s")
    assert not (ws / "m").exists()


# ----- property: readers return a valid object or the project's error, nothing else --------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CELL = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.just("2020-01-01"), st.just(""))
COLUMNS = st.sampled_from(["vv", "vh", "network", "station", "r", "c", "date", "sm_m3m3", "gt", "SMAP", "edate",
                           "0", "1", "152", "ndvi_00", "lc", "x"])


def _mutated_table(draw_columns, rows, base):
    frame = base.copy()
    for col, kind, value in draw_columns:
        if kind == "drop" and col in frame:
            frame = frame.drop(columns=col)
        elif kind == "set":
            frame[col] = [value] * len(frame)
        elif kind == "cell" and col in frame and len(frame):
            frame[col] = frame[col].astype(object)
            frame.iat[0, frame.columns.get_loc(col)] = value
    return frame.iloc[:rows]


BASE = make_frame("fine", n_stations=2, n_dates=3)
EDITS = st.lists(st.tuples(COLUMNS, st.sampled_from(["drop", "set", "cell"]), CELL), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=EDITS, rows=st.integers(0, 6), fmt=st.sampled_from(["parquet", "csv"]), kind=st.sampled_from([None, "fine", "coarse"]))
def test_table_reader_property(tmp_path_factory, edits, rows, fmt, kind):
    from msda.tables import read_samples

    d = tmp_path_factory.mktemp("prop")
    frame = _mutated_table(edits, rows, BASE)
    path = d / f"t.{fmt}"
    try:
        if fmt == "parquet":
            frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(path)
        else:
            frame.to_csv(path, index=False)
    except (ValueError, TypeError, pa.ArrowException):
        return  # a frame pandas itself cannot write: nothing to read
    try:
        samples = read_samples(path, kind)
    except MsdaError:
        return
    f = samples.features()
    assert len(samples) > 0 and np.isfinite(f).all() and (f >= -0.5).all() and (f <= 1.5).all()


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=6)),
                       lambda inner: st.one_of(st.lists(inner, max_size=4),
                                               st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)
SCHEMA_KEYS = st.sampled_from(["name", "scalars", "series", "lo", "hi", "length", "step_days", "units", "encoding",
                               "func", "period", "source", "description"])


@st.composite
def schema_dicts(draw):
    base = json.loads(json.dumps(__import__("msda.schema", fromlist=["x"]).DEFAULT_SCHEMA.to_dict()))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "scalars", "series"]))
        items = base.get(where) if where != "top" else None
        if where != "top" and not (isinstance(items, list) and items and all(isinstance(i, dict) for i in items)):
            where = "top"
        target = base if where == "top" else draw(st.sampled_from(items))
        target[draw(SCHEMA_KEYS)] = draw(JSONISH)
    return base


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(d=st.one_of(schema_dicts(), JSONISH))
def test_schema_reader_property(d):
    from msda.schema import FeatureSchema

    try:
        schema = FeatureSchema.from_dict(d, source="probe")
    except MsdaError:
        return
    assert schema.n_features >= 1


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(edit=st.one_of(st.tuples(st.sampled_from(["format_version", "members", "schema", "format"]), JSONISH),
                      st.tuples(st.sampled_from(["depth", "width", "name"]), JSONISH)))
def test_manifest_reader_property(tmp_path_factory, source, edit):
    from msda.weights import load_ensemble

    d = tmp_path_factory.mktemp("man") / "w"
    shutil.copytree(source / "w", d)
    manifest = json.loads((d / "manifest.json").read_text())
    key, value = edit
    if key in ("depth", "width", "name"):
        manifest["members"][0][key] = value
    else:
        manifest[key] = value
    (d / "manifest.json").write_text(json.dumps(manifest))
    try:
        ensemble = load_ensemble(d)
    except MsdaError:
        return
    assert len(ensemble.specs) >= 1
