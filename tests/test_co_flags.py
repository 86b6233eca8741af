"""Co-flags (scanning/guided.py CO_FLAG_SHARE, selection/co_flags.py): a weak, spread-out flag beside a strong one
is unlearnt only where that is cheap; left out, it keeps the scan's verdict from `verified`."""

from __future__ import annotations

import json

import torch

from backdoor_cli.defenses.base import DefenseOutcome, DefenseParams
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.progress import Reporter
from backdoor_cli.scanning import guided
from backdoor_cli.scanning.guided import CO_FLAG_SHARE, LOCAL_SHARE, ScanEvidence
from backdoor_cli.scanning.inversion import InversionParams
from backdoor_cli.selection.co_flags import CoFlagTrial, worth_trying_without
from backdoor_cli.selection.gentler import CANDIDATE_COST
from backdoor_cli.selection.holdout import HoldoutMonitor
from backdoor_cli.usecases import default_unlearning
from backdoor_cli.usecases.default_unlearning import UnlearningSetup, unlearn_cheap_co_flags
from backdoor_cli.verdicts.removal import judge_removal_by_scan, with_co_flags_left
from helpers import MEAN, STD, Tiny, class_trigger, scan_result, tiny_data


def _evidence(anomaly: list[float], flagged: list[int], shares: dict[int, float]) -> ScanEvidence:
    """Evidence whose chosen classes are `flagged`, each reconstruction keeping `shares[c]` of its proxy ASR in its
    densest window (180 held-out images, 90% sent there whole)."""
    return ScanEvidence(
        scan_result(anomaly, flagged=flagged),
        InversionParams(),
        [class_trigger(c) for c in flagged],
        "flagged by the scan",
        "held-out clean images",
        proxy_before={c: Rate(162, 180) for c in flagged},
        proxy_local={c: Rate(round(162 * shares[c]), 180) for c in flagged},
    )


def test_a_co_flag_is_weak_beside_the_strongest_and_spread_out():
    # the second VGG-16-BN's fresh seed-1 scan: 15.83 (local) and 2.47 (its window keeps 10%)
    evidence = _evidence([0.1, 15.83, 0.2, 2.47], [1, 3], {1: 0.99, 3: 0.10})
    assert evidence.co_flags() == [3]
    # local, or not far weaker, or alone: not a co-flag
    assert _evidence([0.1, 15.83, 0.2, 2.47], [1, 3], {1: 0.99, 3: LOCAL_SHARE + 0.02}).co_flags() == []
    assert _evidence([0.1, 6.0, 0.2, 2.1], [1, 3], {1: 0.99, 3: 0.1}).co_flags() == []  # 2.1 >= 6/3
    assert _evidence([0.1, 0.3, 0.2, 2.47], [3], {3: 0.1}).co_flags() == []
    # both spread out: the weaker one is still the co-flag (the strongest is never one)
    assert _evidence([9.0, 0.1, 2.2, 0.2], [0, 2], {0: 0.2, 2: 0.2}).co_flags() == [2]
    assert CO_FLAG_SHARE == 1 / 3


def _trial(with_acc: float, without_acc: float) -> CoFlagTrial:
    return CoFlagTrial(
        [9], input_acc=0.88, with_acc=with_acc, without_acc=without_acc, proxy_without={9: Rate(90, 180)}
    )


def test_a_co_flag_is_left_out_only_when_unlearning_it_costs_more_than_a_guess_may():
    assert worth_trying_without(0.88, 0.88 - CANDIDATE_COST - 0.005)
    assert not worth_trying_without(0.88, 0.88 - CANDIDATE_COST)
    left = _trial(0.80, 0.86)
    assert left.left_out and "left out" in left.reason() and "class 9 50.0%" in left.reason()
    assert left.to_dict()["kept"] == "without" and left.to_dict()["proxy_asr_without"]["9"]["k"] == 90
    kept = _trial(0.80, 0.80 + CANDIDATE_COST)
    assert not kept.left_out and "the run with it is kept" in kept.reason() and kept.to_dict()["kept"] == "with"


class FakeUnlearning:
    """A `tune` whose held-out accuracy depends on which classes it unlearns (from the evidence at call time), and
    which writes a run-specific value into the model so the kept weights can be told apart."""

    def __init__(self, evidence: ScanEvidence, model: torch.nn.Module, acc: dict[tuple, float]):
        self.evidence, self.model, self.acc = evidence, model, acc
        self.runs: list[tuple] = []

    def tune(self, params, monitor, stop_first_epoch=None):
        classes = tuple(t.target for t in self.evidence.chosen)
        self.runs.append(classes)
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(len(self.runs))
        monitor.curve.append({"epoch": params.sgd.epochs, "holdout_acc": self.acc[classes], "within_budget": True})
        return DefenseOutcome()


def _run(acc: dict[tuple, float], monkeypatch):
    evidence = _evidence([0.1, 15.83, 0.2, 2.47], [1, 3], {1: 0.99, 3: 0.10})
    model = Tiny()
    fake = FakeUnlearning(evidence, model, acc)
    monkeypatch.setattr(
        default_unlearning,
        "proxy_rates",
        lambda m, images, triggers, mean, std: {t.target: Rate(90, 180) for t in triggers},
    )
    setup = UnlearningSetup(
        fake.tune,
        model,
        {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
        MEAN,
        STD,
        Reporter(),
        HoldoutMonitor(tiny_data(), 0.88),
        evidence,
    )
    params = DefenseParams.of(
        "unlearn", epochs=1
    )  # one epoch: no first-epoch stop; the fake's drops ask no gentler run
    (outcome, _, _, _), trial = unlearn_cheap_co_flags(setup, params, list, may_rerun=True)
    return evidence, model, fake, outcome, trial, setup


def test_a_costly_co_flag_is_left_out_and_the_run_without_it_is_the_output(monkeypatch):
    evidence, model, fake, outcome, trial, setup = _run({(1, 3): 0.81, (1,): 0.865}, monkeypatch)
    assert fake.runs == [(1, 3), (1,)]
    assert trial.left_out and evidence.left == [3] and [t.target for t in evidence.chosen] == [1]
    assert evidence.suspected == [1] and evidence.co_flag_trial["kept"] == "without"
    assert all((p == 2).all() for p in model.parameters())  # the second run's weights
    assert setup.monitor.curve[-1]["holdout_acc"] == 0.865
    assert trial.reason() in outcome.notes and "left out" in evidence.choice
    assert evidence.to_dict()["left"] == [3] and evidence.to_dict()["co_flags"]["classes"] == [3]


def test_a_cheap_co_flag_is_unlearnt_and_the_run_with_it_is_restored(monkeypatch):
    evidence, model, fake, outcome, trial, setup = _run({(1, 3): 0.85, (1,): 0.865}, monkeypatch)
    assert fake.runs == [(1, 3), (1,)] and not trial.left_out
    assert evidence.left == [] and [t.target for t in evidence.chosen] == [1, 3] and evidence.suspected == [1, 3]
    assert all((p == 1).all() for p in model.parameters())  # the first run's weights, written back
    assert setup.monitor.curve[-1]["holdout_acc"] == 0.85
    assert trial.reason() in outcome.notes and evidence.co_flag_trial["kept"] == "with"


def test_no_second_run_when_unlearning_every_flag_was_cheap(monkeypatch):
    evidence, model, fake, outcome, trial, setup = _run({(1, 3): 0.88 - CANDIDATE_COST}, monkeypatch)
    assert fake.runs == [(1, 3)] and trial is None and evidence.co_flag_trial is None
    assert evidence.to_dict()["co_flags"] is None and evidence.to_dict()["left"] == []


def test_a_co_flag_left_out_keeps_the_scans_verdict_from_verified():
    # one flag unlearnt, local, its reconstruction gone and ignored by a clean reference: `verified` on its own
    args = (
        [1],
        [1],
        {1: Rate(170, 180)},
        {1: Rate(1, 180)},
        {1: {"flagged": False, "mask_l1": 60, "input_mask_l1": 9}},
    )
    kw = {"planted": {1: Rate(7, 180)}, "local": {1: Rate(168, 180)}}
    assert judge_removal_by_scan(*args, **kw).verdict == "verified"
    left = _trial(0.80, 0.86).to_dict()
    verdict = with_co_flags_left(judge_removal_by_scan(*args, **kw), left)
    assert verdict.verdict == "not_verified" and verdict.evidence["co_flags_left"] == left
    assert "class 9 was flagged too" in verdict.reason and "class 9 50.0%" in verdict.reason
    # a verdict that is not `verified` keeps its word, with the co-flag said
    still = with_co_flags_left(judge_removal_by_scan([1], [1], {1: Rate(170, 180)}, {1: Rate(120, 180)}, {}), left)
    assert still.verdict == "failed" and "class 9 was flagged too" in still.reason


def test_the_co_flag_constants_are_the_ones_documented():
    assert guided.CO_FLAG_SHARE == CO_FLAG_SHARE and LOCAL_SHARE == 0.6 and CANDIDATE_COST == 0.02


# --- through the CLI: the planted toy (conftest.py, target 0) with a second, weak class put among the flags, and the
# co-flag budget lowered below zero so that the trial runs and leaves it out (the logic is the real one) ---


def _purify_with_a_co_flag(planted, out, monkeypatch, extra: int | None):
    from typer.testing import CliRunner

    from backdoor_cli.cli import app
    from backdoor_cli.selection import co_flags
    from backdoor_cli.usecases import purify

    def with_extra(result, precaution=False):
        if extra is not None:
            result.flagged = sorted({*result.flagged, extra})
        return guided.choose_triggers(result, precaution)

    monkeypatch.setattr(purify, "choose_triggers", with_extra)
    monkeypatch.setattr(ScanEvidence, "co_flags", lambda self: [extra] if extra is not None else [])
    monkeypatch.setattr(co_flags, "CANDIDATE_COST", -1.0)
    result = CliRunner().invoke(
        app,
        ["purify", str(planted["model"]), "--data", str(planted["data"]), "--out", str(out), "--clean-count", "400"]
        + ["--epochs", "2", "--device", "cpu", "--json", "--seed", "3"],
    )
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), result


def test_the_default_leaves_a_costly_co_flag_out_and_writes_the_run_without_it(planted_template, monkeypatch, tmp_path):
    report, result = _purify_with_a_co_flag(planted_template, tmp_path / "co", monkeypatch, extra=2)
    scan = report["scan"]
    assert 0 in scan["flagged"] and 2 in scan["flagged"], scan["flagged"]
    assert scan["left"] == [2] and 2 not in scan["unlearnt"] and 0 in scan["unlearnt"]
    trial = scan["co_flags"]
    assert trial["classes"] == [2] and trial["kept"] == "without" and "2" in trial["proxy_asr_without"]
    assert trial["reason"] in report["method"]["notes"] and "left out of the unlearning" in scan["choice"]
    assert any(n.startswith("unlearnt the reconstructed trigger of class 0, 2") for n in trial["with_notes"])
    by_scan = report["removal"]["evidence"]["scan"]
    assert by_scan["verdict"] != "verified" and "class 2 was flagged too" in by_scan["reason"]
    assert by_scan["co_flags_left"] == trial
    assert "is a co-flag" in " ".join(result.stderr.split())
    # the written weights are those of the default run that never had class 2 to unlearn, bit for bit
    alone, _ = _purify_with_a_co_flag(planted_template, tmp_path / "alone", monkeypatch, extra=None)
    assert alone["scan"]["co_flags"] is None and alone["scan"]["left"] == []
    assert (tmp_path / "co" / "purified.safetensors").read_bytes() != b""
    from backdoor_cli.checkpoint import read_checkpoint

    a = read_checkpoint(str(tmp_path / "co" / "purified.safetensors")).state_dict
    b = read_checkpoint(str(tmp_path / "alone" / "purified.safetensors")).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scan_report(local: dict[int, float]):
    from backdoor_cli.reports.scan_report import ScanReport

    result = scan_result([0.1, 15.83, 0.2, 2.47], flagged=[1, 3])
    result.anomaly_raw = list(result.anomaly)
    return ScanReport({}, {}, {}, result, {}, {}, {}, local=local)


def test_the_scan_report_marks_a_co_flag_and_says_what_purify_does_with_it():
    report = _scan_report({1: 0.99, 3: 0.10})
    assert report.co_flags == [3]
    doc = report.to_dict()
    assert doc["co_flags"] == [3] and doc["suspected_classes"] == [1, 3] and doc["backdoor_suspected"]
    marks = {c["class"]: c["co_flag"] for c in doc["classes"]}
    assert marks == {0: False, 1: False, 2: False, 3: True}
    verdicts = report.class_verdicts()
    assert "a co-flag" in verdicts[3] and "only where that is cheap" in verdicts[3]
    assert "co-flag" not in verdicts[1]
    # local, or its locality not measured: no co-flag
    assert _scan_report({1: 0.99, 3: 0.9}).co_flags == [] and _scan_report({}).co_flags == []
