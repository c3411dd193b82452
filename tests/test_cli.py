import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from msda.cli import app
from msda.tables import write_samples
from msda.weights import save_authors

runner = CliRunner()
COMMANDS = [[], ["predict"], ["pretrain"], ["adapt"], ["simulate"], ["validate"], ["convert"], ["demo"], ["map"], ["scene"], ["experiment"], ["report"], ["prepare"], ["prepare", "ismn"], ["prepare", "smap"], ["prepare", "static"], ["prepare", "series"], ["prepare", "gee"], ["prepare", "samples"], ["weights"], ["weights", "info"],
            ["weights", "convert"], ["weights", "init"], ["calibrate"], ["schema"], ["schema", "show"], ["schema", "write"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "msda")
def test_help_everywhere(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_predict_validate_convert(tmp_path, fine, small_ensemble):
    save_authors(small_ensemble, tmp_path / "pt")
    write_samples(fine, tmp_path / "input_fine.csv")
    r = runner.invoke(app, ["validate", str(tmp_path / "input_fine.csv")])
    assert r.exit_code == 0, r.output
    assert "24 fine samples" in r.output and "networks: ARM, SCAN, USCRN" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "input_fine.csv"), str(tmp_path / "f.parquet"), "--networks", "SCAN"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["weights", "convert", str(tmp_path / "pt"), str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "-w", str(tmp_path / "w"), "-s", str(tmp_path / "f.parquet"), "-o", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0, r.output
    out = pd.read_parquet(tmp_path / "p.parquet")
    assert len(out) == 12 and {"sm_pred", "sm_std", "station", "m_2_16"} <= set(out.columns)
    r = runner.invoke(app, ["weights", "info", str(tmp_path / "w")])
    assert "3 members" in r.output and "converted_from" in r.output


def test_errors_are_one_line(tmp_path, fine):
    write_samples(fine, tmp_path / "f.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "msda.cli", "validate", str(tmp_path / "f.parquet"), "--networks", "NOPE"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "NOPE" in lines[0]
    proc = subprocess.run(
        [sys.executable, "-m", "msda.cli", "--debug", "validate", str(tmp_path / "f.parquet"), "--networks", "NOPE"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_weights_init_and_schema_write(tmp_path):
    r = runner.invoke(app, ["weights", "init", "-o", str(tmp_path / "w"), "--widths", "8,16", "--depths", "1", "--seed", "3"])
    assert r.exit_code == 0 and "2 untrained members" in r.output
    r = runner.invoke(app, ["schema", "write", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0
    r = runner.invoke(app, ["schema", "show", str(tmp_path / "s.yaml")])
    assert "153 columns" in r.output and "sin(2 pi doy/365)" in r.output


def test_progress_bars_do_not_flood_a_log(tmp_path, coarse):
    write_samples(coarse, tmp_path / "c.parquet")
    proc = subprocess.run([sys.executable, "-m", "msda.cli", "pretrain", "--samples", str(tmp_path / "c.parquet"),
                           "--out", str(tmp_path / "w"), "--widths", "8", "--depths", "1", "--epochs", "40",
                           "--batch", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    updates = [s for s in proc.stderr.replace("\r", "\n").splitlines() if "pretrain" in s]
    assert 1 <= len(updates) <= 6, len(updates)  # 240 steps: the first and last lines, not one per step


def test_schema_show_aligns_long_names(tmp_path):
    (tmp_path / "s.toml").write_text(
        'name = "long"\n[[scalars]]\nname = "backscatter_vv_descending"\nunits = "dB"\nlo = -30\nhi = 5\n'
        '[[scalars]]\nname = "vh"\nunits = "dB"\nlo = -35\nhi = 0\n'
        '[[series]]\nname = "ndvi"\nunits = "1"\nlo = -0.2\nhi = 1\nlength = 12\nstep_days = 16\n')
    r = runner.invoke(app, ["schema", "show", str(tmp_path / "s.toml")])
    assert r.exit_code == 0, r.output
    rows = r.output.splitlines()[1:]
    starts = {line.index("[", line.index("]") + 1) for line in rows}  # where each range column starts
    assert len(rows) == 3 and len(starts) == 1, r.output


def test_demo_checks_its_scale_before_any_work(tmp_path, capsys):
    """Too small a benchmark for the quick experiment's N is refused at once, naming the least scale."""
    import time

    from conftest import run_cli

    t0 = time.perf_counter()
    code, err = run_cli(["demo", "--out", str(tmp_path / "d"), "--scale", "0.1"], capsys)
    assert code == 2 and "--scale 0.1 gives SCAN 19 stations" in err and "--scale 0.12 or more" in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "d").exists()
