"""Smoke test of benchmarks/bench_purify.py: --quick on the bundled MNIST sample, JSON shape only.

No timing assertions: the figures depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("load", "evaluate_before", "tune", "evaluate_after", "write")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_purify", REPO / "benchmarks" / "bench_purify.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_both_pipelines_and_ratio(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--device", "cpu", "--data", str(REPO / "backdoor_cli" / "assets" / "mnist_sample"),
                       "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out)])
    result = json.loads(out.read_text())
    # Exit code follows the comparability check; both outcomes are legitimate for a 1-epoch toy run.
    assert code == (0 if result["check"]["passed"] else 1)
    for name in ("bdclean", "reference"):
        run = result[name]
        assert set(STAGES) <= set(run["stages"]), name
        assert all(run["stages"][s] >= 0 for s in STAGES)
        assert run["total"] > 0
        assert run["after"]["clean_acc"]["n"] == run["before"]["clean_acc"]["n"] > 0
        assert run["after"]["asr"] is not None
        assert set(run["throughput"]) == {"evaluate_before_images_per_s", "evaluate_after_images_per_s",
                                          "tune_images_per_s"}
    assert result["speedup"]["total"] > 0
    assert set(STAGES) <= set(result["speedup"])
    assert result["device"]["name"]
    assert result["settings"]["transforms"]
    # Same checkpoint, same images: the two pipelines must agree before tuning.
    assert result["check"]["same_eval_images"] is True
    assert result["bdclean"]["before"]["clean_acc"]["n"] == result["reference"]["before"]["clean_acc"]["n"]
    assert "speed-up (reference / bdclean)" in capsys.readouterr().out
