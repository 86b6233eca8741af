"""The paired change of C-Acc and ASR between the input and the purified model: Newcombe's interval (its
coverage, its agreement with the normal approximation where that holds, its symmetry), the per-image outcomes
an evaluation keeps (in memory and in the evaluation cache), and the interval in purify's JSON, report.md and
terminal."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.evaluation.cache import CacheKey, EvalCache
from backdoor_cli.evaluation.measure import evaluate_model
from backdoor_cli.evaluation.paired import (
    Outcomes,
    newcombe_paired_interval,
    outcome_changes,
    pack_bits,
    paired_change,
    unpack_bits,
)
from helpers import corner_labelled_eval_sets

CPU = torch.device("cpu")
MEAN, STD = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
runner = CliRunner()


def test_interval_covers_the_true_change_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    # (images, both right, right before only, right after only): a purification's typical table, and a small one
    for n, both, lost, gained in ((400, 0.85, 0.04, 0.02), (60, 0.80, 0.05, 0.05)):
        truth = gained - lost
        covered = 0
        for _ in range(2000):
            cells = rng.multinomial(n, [both, lost, gained, 1 - both - lost - gained])
            low, high = newcombe_paired_interval(cells[0], cells[2], cells[1], cells[3])
            covered += low <= truth <= high
        assert 0.93 <= covered / 2000 <= 0.99, (n, covered)


def test_interval_agrees_with_the_normal_approximation_on_many_images():
    both, first_only, second_only, neither = 8500, 300, 500, 700
    n = both + first_only + second_only + neither
    diff = (first_only - second_only) / n
    se = math.sqrt(first_only + second_only - (first_only - second_only) ** 2 / n) / n
    low, high = newcombe_paired_interval(both, first_only, second_only, neither)
    assert abs(low - (diff - 1.959964 * se)) < 1e-3 and abs(high - (diff + 1.959964 * se)) < 1e-3


def test_interval_is_symmetric_in_the_two_models_and_tight_when_they_agree():
    low, high = newcombe_paired_interval(1700, 43, 112, 145)
    back_low, back_high = newcombe_paired_interval(1700, 112, 43, 145)
    assert low < (43 - 112) / 2000 < high < 0
    assert (back_low, back_high) == pytest.approx((-high, -low))
    same_low, same_high = newcombe_paired_interval(1800, 0, 0, 200)
    assert same_low <= 0 <= same_high and same_high - same_low < 0.005
    # far tighter than two independent Wilson intervals of 2,000 images (each about +-1.4 points)
    assert high - low < 0.03
    assert newcombe_paired_interval(0, 0, 0, 0) == (-1.0, 1.0)
    low, high = newcombe_paired_interval(0, 10, 0, 0)  # all 10 flipped: the two Wilson half-widths, 0.28 each
    assert high == 1.0 and low == pytest.approx(1 - math.hypot(0.2775, 0.2775), abs=1e-3)


def test_paired_change_counts_images_and_refuses_unequal_lengths():
    before = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)
    after = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    change = paired_change(before, after)
    assert (change.n, change.both, change.lost, change.gained, change.neither) == (6, 2, 2, 1, 1)
    assert change.value == pytest.approx(-1 / 6)
    record = change.to_dict()
    assert record["lost"] == 2 and record["gained"] == 1 and record["ci95"][0] < -1 / 6 < record["ci95"][1]
    with pytest.raises(ValueError, match="differ in length"):
        paired_change(before, after[:5])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_outcome_bits_round_trip(n):
    bits = torch.from_numpy(np.random.default_rng(n).random(n) < 0.3)
    assert torch.equal(unpack_bits(json.loads(json.dumps(pack_bits(bits)))), bits)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits({"n": n + 9, "bits": pack_bits(bits)["bits"]})


class ByCorner(nn.Module):
    """Predicts the class written in the top-left pixel, except that class `wrong` is called class 0; a white
    bottom-right pixel sends every image to class 0."""

    def __init__(self, wrong: int):
        super().__init__()
        self.wrong = wrong

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255).round().long()
        label = torch.where((label == self.wrong) | (x[:, 0, -1, -1] > 0.99), torch.zeros_like(label), label)
        return torch.nn.functional.one_hot(label, 4).float()


def test_evaluation_keeps_each_images_outcome_and_two_evaluations_pair_up():
    sets = corner_labelled_eval_sets()
    before = evaluate_model(ByCorner(wrong=1), sets, MEAN, STD, CPU, batch_size=7)
    after = evaluate_model(ByCorner(wrong=2), sets, MEAN, STD, CPU, batch_size=7)
    assert torch.equal(before.outcomes.clean_correct, sets.clean.y != 1)
    assert int(before.outcomes.target_hits.sum()) == before.asr.k == 30
    changes = outcome_changes(before.outcomes, after.outcomes)
    # class 1 is right only after (10 images gained), class 2 only before (10 lost): no net change, yet 20 moved
    assert (changes["clean_acc"].lost, changes["clean_acc"].gained) == (10, 10)
    assert changes["asr"].lost == changes["asr"].gained == 0
    assert outcome_changes(before.outcomes, None) is None


def test_cache_keeps_the_outcomes_and_reads_an_entry_without_them_or_with_wrong_ones_as_a_miss(tmp_path):
    result = evaluate_model(ByCorner(wrong=1), corner_labelled_eval_sets(), MEAN, STD, CPU)
    key = CacheKey("k" * 64, {})
    EvalCache(tmp_path).put(key, result)
    back = EvalCache(tmp_path).get(key)
    assert torch.equal(back.outcomes.clean_correct, result.outcomes.clean_correct)
    assert torch.equal(back.outcomes.target_hits, result.outcomes.target_hits)
    entry = json.loads((tmp_path / f"{key.digest}.json").read_text())
    stale = {k: v for k, v in entry.items() if k != "outcomes"}  # written before outcomes were kept
    (tmp_path / f"{key.digest}.json").write_text(json.dumps(stale))
    assert EvalCache(tmp_path).get(key) is None
    flipped = Outcomes(~result.outcomes.clean_correct, result.outcomes.target_hits).to_dict()
    (tmp_path / f"{key.digest}.json").write_text(json.dumps({**entry, "outcomes": flipped}))
    assert EvalCache(tmp_path).get(key) is None
    (tmp_path / f"{key.digest}.json").write_text("[1, 2]")  # JSON, but not an entry
    assert EvalCache(tmp_path).get(key) is None
    (tmp_path / f"{key.digest}.json").unlink()
    os.mkfifo(tmp_path / f"{key.digest}.json")  # a hostile folder's FIFO: never opened (a read would block)
    assert EvalCache(tmp_path).get(key) is None


def test_purify_reports_the_paired_change_in_json_markdown_and_terminal(toy_model, tmp_path):
    out = tmp_path / "purified"
    args = ["purify", str(toy_model["model"]), "--data", str(toy_model["data"]), "--method", "ft", "--epochs", "1"]
    args += ["--out", str(out)]
    shown = runner.invoke(app, [*args, "--device", "cpu"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "paired change: C-Acc " in shown.stdout and "paired change: ASR " in shown.stdout
    report = json.loads((out / "report.json").read_text())
    acc, asr = report["delta"]["paired"]["clean_acc"], report["delta"]["paired"]["asr"]
    before, after = report["before"], report["after"]
    assert acc["n"] == before["clean_acc"]["n"] and asr["n"] == before["asr"]["n"]
    assert acc["gained"] - acc["lost"] == after["clean_acc"]["k"] - before["clean_acc"]["k"]
    assert asr["gained"] - asr["lost"] == after["asr"]["k"] - before["asr"]["k"]
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    markdown = (out / "report.md").read_text()
    assert "| change, 95% CI (paired) |" in markdown and f"({acc['lost']} of {acc['n']} images lost" in markdown
