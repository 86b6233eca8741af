"""The ASR's untriggered counterpart: the share of the same non-target images a model sends to the target
without the trigger, counted on models whose answers are known, read back from the cache, and shown
beside the ASR by `evaluate` and `purify` (JSON, terminal, report.md)."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.evaluation.cache import CacheKey, EvalCache, result_from_dict
from backdoor_cli.evaluation.measure import EvalResult, build_eval_sets, evaluate_model
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.reports.report import trigger_lift_line
from helpers import corner_labelled_eval_sets, make_npz_dataset

CPU = torch.device("cpu")
MEAN, STD = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
runner = CliRunner()


class BiasedToZero(nn.Module):
    """Class 0 for images whose class (top-left pixel) is 1, whatever the corner; the white corner patch sends
    class 2 to 0 as well; every other image gets its class."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255).round().long()
        white = x[:, 0, -1, -1] > 0.99
        out = torch.where((label == 1) | (white & (label == 2)), torch.zeros_like(label), label)
        return torch.nn.functional.one_hot(out, 4).float()


def test_untriggered_rate_counts_the_same_non_target_images_without_the_trigger():
    result = evaluate_model(BiasedToZero(), corner_labelled_eval_sets(), MEAN, STD, CPU, batch_size=7)
    # 30 non-target images; class 1 (10) goes to 0 untriggered, classes 1 and 2 (20) with the trigger
    assert (result.asr_no_trigger.k, result.asr_no_trigger.n) == (10, 30)
    assert (result.asr.k, result.asr.n) == (20, 30)
    assert abs(result.trigger_lift - 10 / 30) < 1e-9
    line = trigger_lift_line(result, 0)
    assert "33.33% of the non-target images to class 0" in line and "adds 33.33 points" in line


def test_a_trigger_that_repels_is_said_to_lower_the_rate():
    result = EvalResult(Rate(9, 10), Rate(1, 30), Rate(20, 30), 0.0, 40, asr_no_trigger=Rate(4, 30))
    assert "lowers it by 10.00 points" in trigger_lift_line(result, 3)
    assert trigger_lift_line(EvalResult(Rate(9, 10), None, None, 0.0, 10), None) is None


def test_no_trigger_no_untriggered_rate():
    y = torch.arange(8) % 4
    sets = build_eval_sets(ImageSet(torch.zeros(8, 8, 8, 3, dtype=torch.uint8), y), None, CPU)
    result = evaluate_model(BiasedToZero(), sets, MEAN, STD, CPU)
    assert result.asr is None and result.asr_no_trigger is None and result.to_dict()["asr_no_trigger"] is None


def test_cache_round_trip_keeps_it_and_an_entry_without_it_is_a_miss(tmp_path):
    result = evaluate_model(BiasedToZero(), corner_labelled_eval_sets(), MEAN, STD, CPU)
    back = result_from_dict(json.loads(json.dumps(result.to_dict())))
    assert (back.asr_no_trigger.k, back.asr_no_trigger.n) == (10, 30)
    key = CacheKey("k" * 64, {})
    old = result.to_dict()
    del old["asr_no_trigger"]  # an entry written before the rate was counted
    entry = {"schema": "bdclean.eval-cache/1", "metrics": old, "outcomes": result.outcomes.to_dict()}
    (tmp_path / f"{key.digest}.json").write_text(json.dumps(entry))
    assert EvalCache(tmp_path).get(key) is None
    entry["metrics"] = result.to_dict()  # the same entry with the rate is read
    (tmp_path / f"{key.digest}.json").write_text(json.dumps(entry))
    assert EvalCache(tmp_path).get(key).asr_no_trigger.k == 10


def test_evaluate_and_purify_report_it(tmp_path):
    data = make_npz_dataset(tmp_path / "data")
    model = tmp_path / "bd.safetensors"
    base = ["--device", "cpu", "--quiet"]
    trained = runner.invoke(
        app,
        ["train", "--arch", "test_tiny", "--data", str(data), "--out", str(model), "--trigger", "badnets"]
        + ["--poison-rate", "0.1", "--epochs", "2", "--lr", "0.05", *base],
    )
    assert trained.exit_code == 0, trained.output
    report = json.loads(runner.invoke(app, ["evaluate", str(model), "--data", str(data), "--json", *base]).stdout)
    rate = report["metrics"]["asr_no_trigger"]
    assert rate["n"] == report["metrics"]["asr"]["n"] and 0 <= rate["k"] <= rate["n"]
    assert "asr_no_trigger" in report["definitions"]
    table = runner.invoke(app, ["evaluate", str(model), "--data", str(data), *base])
    assert table.exit_code == 0 and "ASR without trigger" in table.stdout
    assert "without the trigger the model sends" in table.stdout
    out = tmp_path / "purified"
    purified = runner.invoke(
        app,
        ["purify", str(model), "--data", str(data), "--method", "ft", "--epochs", "1", "--out", str(out), *base],
    )
    assert purified.exit_code == 0, purified.output
    saved = json.loads((out / "report.json").read_text())
    assert saved["before"]["asr_no_trigger"]["n"] == saved["after"]["asr_no_trigger"]["n"] == rate["n"]
    markdown = (out / "report.md").read_text()
    assert "| ASR without trigger |" in markdown and "- after: without the trigger the model sends" in markdown
