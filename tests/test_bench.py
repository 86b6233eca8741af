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
                       "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out), "--repeat", "2"])
    result = json.loads(out.read_text())
    repeats = result["repeats"]
    assert repeats["count"] == 2 and len(repeats["totals"]) == 2 and len(repeats["total_ratios"]) == 2
    assert min(repeats["total_ratios"]) <= repeats["median_total_ratio"] <= max(repeats["total_ratios"])
    first = repeats["totals"][0]
    assert first["bdclean"] == round(result["bdclean"]["total"], 3)  # the reported stages are the first pair's
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
    printed = capsys.readouterr().out
    assert "speed-up (reference / bdclean)" in printed and "total ratio over 2 repeats: median" in printed


def test_profile_step_counts_arithmetic_and_groups_the_time(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    assert module.main(["--arch", "test_tiny", "--device", "cpu", "--batch-size", "8", "--size", "8",
                        "--steps", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # TinyNet: a 3->4 3x3 conv on 8x8 (8*8*4*27 MACs) and a 4->10 linear head
    assert result["macs_per_image"] == 8 * 8 * 4 * 27 + 4 * 10
    shares = result["profile_channels_last"]
    assert abs(sum(shares.values()) - 1.0) < 0.01
    assert "convolution forward" in shares and "convolution backward" in shares
    for fmt in ("contiguous", "channels_last"):
        assert result[fmt]["step_ms"] > 0 and result[fmt]["eval_images_per_s"] > 0
    assert "share of a channels_last training step" in capsys.readouterr().out


def test_repeat_must_be_positive(capsys):
    bench = _load_bench()
    assert bench.main(["--quick", "--device", "cpu", "--repeat", "0"]) == 2
    assert "--repeat" in capsys.readouterr().err
