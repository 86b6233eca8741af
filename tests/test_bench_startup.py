"""benchmarks/bench_startup.py: its baseline and load measurements in-process, its --quick mode on a subset."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_startup.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_startup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_plain_baseline_and_load_pair_on_the_quick_inputs(tmp_path):
    bench = _bench()
    checkpoint, data = bench.make_quick_inputs(tmp_path)
    plain = bench.plain_evaluate(checkpoint, data, "resnet20", bench.IMAGENET_MEAN, bench.IMAGENET_STD, 30, "cpu")
    assert set(plain["times"]) == {"import", "load", "data", "evaluate"}
    assert plain["images"] == 30 + 20 and 0 <= plain["clean_acc"] <= 1  # 30 images, 20 of them not the target
    pair = bench.load_pair(checkpoint, data, "resnet20", bench.IMAGENET_MEAN, bench.IMAGENET_STD, True)
    assert pair["bdclean"] > 0 and pair["plain"] > 0


def test_quick_mode_writes_its_json(tmp_path):
    out = tmp_path / "startup.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "python,help", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["device"]["type"] == "cpu" and "cpu_capability" in report["device"]
    assert set(report["wall_seconds"]) == {"python", "help"}
    assert report["ratios"]["help / python"] > 0 and "help / import_torch" not in report["ratios"]
    assert "--help" in report["commands"]["help"]
