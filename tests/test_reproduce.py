"""experiments/reproduce_fst.py: the grid driver runs, writes its table, and resumes from its files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from helpers import make_npz_dataset

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_fst", REPO / "experiments" / "reproduce_fst.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grid_writes_table_and_resumes(tmp_path, capsys):
    repro = _load()
    data = make_npz_dataset(tmp_path / "toy")
    args = ["--small", "--data", str(data), "--arch", "test_tiny", "--train-epochs", "1", "--attacks", "badnets",
            "--rates", "0.1", "--methods", "ft,fst", "--clean-fraction", "0.25", "--eval-limit", "60",
            "--runs", str(tmp_path / "runs"), "--doc", str(tmp_path / "table.md"), "--device", "cpu", "--quiet"]
    assert repro.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| badnets")]
    assert [row.split("|")[3].strip() for row in rows] == ["original", "ft", "fst"]
    model = tmp_path / "runs" / "models" / "badnets-0.1.safetensors"
    stamp = model.stat().st_mtime_ns
    (tmp_path / "runs" / "results" / "badnets-0.1-fst.json").unlink()  # as if the run had stopped here
    assert repro.main(args) == 0
    assert model.stat().st_mtime_ns == stamp  # the model was reused, only the missing piece was redone
    assert (tmp_path / "runs" / "results" / "badnets-0.1-fst.json").exists()
