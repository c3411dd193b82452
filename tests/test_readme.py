"""The README's quick start runs as written: its marked shell and Python blocks, in order, in an
empty folder, at a smaller scale (the replacements below; each must still be in the README)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
# smaller, not different: fewer stations and epochs, a one-cell, one-date map
SMALLER = {
    "--scale 0.2": "--scale 0.05",
    "--epochs 20": "--epochs 1",
    "--epochs 2 ": "--epochs 1 ",
    "--inputs demo --out maps": "--inputs demo --out maps --cells 1x1 --dates 1",
    "TrainSettings(epochs=5, seed=0)": "TrainSettings(epochs=1, seed=0)",
}


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block right after a ``<!-- readme-test -->`` line."""
    return re.findall(r"<!-- readme-test -->\n```(\w+)\n(.*?)```", text, flags=re.S)


def test_readme_quick_start_runs_as_written(tmp_path):
    text = README.read_text()
    blocks = marked_blocks(text)
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    for old in SMALLER:
        assert sum(old in code for _, code in blocks) == 1, f"the README's quick start no longer has {old!r}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MSDA_THREADS": "1"}
    for lang, code in blocks:
        for old, new in SMALLER.items():
            code = code.replace(old, new)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README {lang} block failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    for made in ("bench/fine.parquet", "w9km", "run/weights", "uscrn.parquet", "pred.parquet", "maps/maps.zarr",
                 "own.parquet", "run_py"):
        assert (tmp_path / made).exists(), made
