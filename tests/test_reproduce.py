"""experiments/reproduce_fst.py: the grid driver runs, writes its table, and resumes from its files."""

from __future__ import annotations

import importlib.util
import json
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
    args = [
        "--small",
        "--data",
        str(data),
        "--arch",
        "test_tiny",
        "--train-epochs",
        "1",
        "--attacks",
        "badnets",
        "--rates",
        "0.1",
        "--methods",
        "ft,fst",
        "--clean-fraction",
        "0.25",
        "--eval-limit",
        "60",
        "--runs",
        str(tmp_path / "runs"),
        "--doc",
        str(tmp_path / "table.md"),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert repro.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    lines = table.splitlines()
    full = lines[next(i for i, line in enumerate(lines) if line.startswith("| attack | rate | model |")) :]
    rows = [line for line in full if line.startswith("| badnets")]
    assert [row.split("|")[3].strip() for row in rows] == ["original", "ft", "fst"]
    model = tmp_path / "runs" / "models" / "badnets-0.1.safetensors"
    stamp = model.stat().st_mtime_ns
    (tmp_path / "runs" / "results" / "badnets-0.1-fst.json").unlink()  # as if the run had stopped here
    assert repro.main(args) == 0
    assert model.stat().st_mtime_ns == stamp  # the model was reused, only the missing piece was redone
    assert (tmp_path / "runs" / "results" / "badnets-0.1-fst.json").exists()


def test_doc_keeps_hand_written_text_and_summarises(tmp_path):
    repro = _load()
    data = make_npz_dataset(tmp_path / "toy")
    doc = tmp_path / "reproduction.md"
    doc.write_text(
        "# Title\n\nAnalysis written by hand.\n\n<!-- BEGIN generated:small -->\nold table\n"
        "<!-- END generated:small -->\n\nMore analysis.\n"
    )
    args = [
        "--small",
        "--data",
        str(data),
        "--arch",
        "test_tiny",
        "--train-epochs",
        "1",
        "--attacks",
        "badnets",
        "--rates",
        "0.1",
        "--methods",
        "ft,lp,fst",
        "--clean-fraction",
        "0.25",
        "--eval-limit",
        "60",
        "--fst-alphas",
        "0.05",
        "--runs",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert repro.main(args) == 0
    extra = json.loads((tmp_path / "runs" / "results" / "badnets-0.1-fst-a0.05.json").read_text())
    assert extra["method"]["name"] == "fst" and extra["method"]["params"]["alpha"] == 0.05
    text = doc.read_text()
    assert "| badnets | 10.0% | fst-a0.05 |" in text
    assert text.startswith("# Title\n\nAnalysis written by hand.\n") and text.rstrip().endswith("More analysis.")
    assert "old table" not in text and text.count("<!-- BEGIN generated:small -->") == 1
    assert "python experiments/reproduce_fst.py --small" in text
    summary = [line for line in text.splitlines() if line.startswith("| badnets | 10.0% | ")]
    # one summary row (it has the margin column) and the per-method rows of the full table
    margin_rows = [row for row in summary if row.split("|")[7].strip().split(":")[0] in ("yes", "no", "n/a")]
    assert len(margin_rows) == 1


def test_summary_decides_on_intervals(tmp_path):
    repro = _load()
    results = tmp_path / "results"
    results.mkdir()

    def write(name, asr, lo, hi, acc=0.5):
        import json

        rate = {"value": asr, "ci95": [lo, hi]}
        body = (
            {"metrics": {"asr": rate, "clean_acc": {"value": 0.8, "ci95": [0.79, 0.81]}}}
            if name == "original"
            else {"after": {"asr": rate, "clean_acc": {"value": acc, "ci95": [acc - 0.01, acc + 0.01]}}}
        )
        (results / f"blended-0.01-{name}.json").write_text(json.dumps(body))

    write("original", 0.9, 0.88, 0.92)
    write("ft", 0.30, 0.28, 0.32)
    write("lp", 0.60, 0.58, 0.62)
    write("fst", 0.02, 0.01, 0.03, acc=0.7)
    row = repro.render_summary(tmp_path, ("blended",), (0.01,), ("ft", "lp", "fst")).splitlines()[2]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3].startswith("FT 30.0") and cells[5] == "+28.0" and cells[6] == "yes" and cells[7] == "10.0"
    write("fst", 0.29, 0.27, 0.31)  # overlapping intervals: not a demonstrated advantage
    row = repro.render_summary(tmp_path, ("blended",), (0.01,), ("ft", "lp", "fst")).splitlines()[2]
    assert [c.strip() for c in row.split("|")[1:-1]][6] == "no"
    write("original", 0.3, 0.28, 0.32)  # the training run did not plant the backdoor: no verdict
    row = repro.render_summary(tmp_path, ("blended",), (0.01,), ("ft", "lp", "fst")).splitlines()[2]
    assert [c.strip() for c in row.split("|")[1:-1]][6].startswith("n/a: not planted")


def test_default_row_and_render_only_from_results_brought_back(tmp_path):
    """`default` is `purify` with no --method (the recipe); --render-only redraws the table from results
    alone (the GPU machine's models stay there), names the device given, and trains nothing."""
    repro = _load()
    data = make_npz_dataset(tmp_path / "toy")
    common = [
        "--small",
        "--data",
        str(data),
        "--arch",
        "test_tiny",
        "--train-epochs",
        "1",
        "--attacks",
        "badnets",
        "--rates",
        "0.1",
        "--methods",
        "fst,default",
        "--clean-fraction",
        "0.25",
        "--eval-limit",
        "60",
        "--runs",
        str(tmp_path / "runs"),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert repro.main([*common, "--doc", str(tmp_path / "first.md")]) == 0
    default = json.loads((tmp_path / "runs" / "results" / "badnets-0.1-default.json").read_text())
    assert default["method"]["recipe"]["recommended"] is True
    for model in (tmp_path / "runs" / "models").iterdir():
        model.unlink()
    doc = tmp_path / "again.md"
    assert repro.main([*common, "--doc", str(doc), "--render-only", "--device-name", "NVIDIA H200"]) == 0
    assert not any((tmp_path / "runs" / "models").iterdir())  # nothing was trained again
    text = doc.read_text()
    assert "on NVIDIA H200:" in text and "--render-only" not in text
    assert "| badnets | 10.0% | default |" in text and "| badnets | 10.0% | fst |" in text
