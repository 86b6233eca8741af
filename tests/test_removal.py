"""The removal verdict: verified only on evidence, never above 20% ASR, and --require-verified as a gate."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.verdicts.removal import FAILED_ASR, judge_removal
from helpers import train_toy_model

TRIGGER = {"type": "patch", "target": 0}
runner = CliRunner()


def test_no_trigger_is_never_verified():
    verdict = judge_removal(None, None, None)
    assert verdict.verdict == "not_verified" and "--trigger" in verdict.reason and "scan" in verdict.reason


def test_a_trigger_that_never_worked_verifies_nothing():
    verdict = judge_removal(TRIGGER, Rate(90, 900), Rate(1, 900))
    assert verdict.verdict == "not_verified" and "not a working backdoor" in verdict.reason


def test_a_trigger_that_stopped_working_is_verified_for_that_trigger_only():
    verdict = judge_removal(TRIGGER, Rate(880, 900), Rate(9, 900))
    assert verdict.verdict == "verified" and "other triggers were not tested" in verdict.reason
    assert verdict.evidence["asr_after"]["k"] == 9 and verdict.evidence["trigger"] == TRIGGER


@pytest.mark.parametrize("k", range(0, 901, 10))
def test_never_verified_above_the_failure_bound(k):
    """Over every ASR after purification: verified only at or below 5% (and a tight interval), failed above
    20%, never verified above 20%."""
    verdict = judge_removal(TRIGGER, Rate(880, 900), Rate(k, 900))
    if k / 900 > FAILED_ASR:
        assert verdict.verdict == "failed"
    if verdict.verdict == "verified":
        assert k / 900 <= 0.05


def test_a_small_sample_is_not_enough_to_verify():
    """0 of 20 triggered images: the point is 0% but the upper bound is ~16%, too loose to verify."""
    assert judge_removal(TRIGGER, Rate(19, 20), Rate(0, 20)).verdict == "not_verified"


def _purify(toy_model, out, *args):
    return runner.invoke(
        app,
        [
            "purify",
            toy_model["model"],
            "--data",
            toy_model["data"],
            "--out",
            str(out),
            "--method",
            "ft",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            *args,
        ],
    )


def test_every_purify_report_carries_the_verdict_and_require_verified_gates_it(toy_model, tmp_path):
    result = _purify(toy_model, tmp_path / "a")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    verdict = report["removal"]["verdict"]
    assert verdict in ("verified", "not_verified", "failed") and report["removal"]["evidence"]["asr_after"]
    assert "## Removal verdict" in (tmp_path / "a" / "report.md").read_text()
    gated = _purify(toy_model, tmp_path / "b", "--require-verified")
    gate = [g for g in json.loads(gated.stdout)["gates"] if g["gate"] == "require-verified"][0]
    assert gate["passed"] == (verdict == "verified")
    assert gated.exit_code == (0 if verdict == "verified" else 1)


def test_require_verified_without_a_trigger_exits_1(tmp_path):
    """A model with no recorded trigger, purified without --trigger: not verified, so the gate fails."""
    from safetensors.torch import save_file

    from backdoor_cli.checkpoint import read_checkpoint

    toy_model = train_toy_model(tmp_path / "t", epochs=1)
    plain = tmp_path / "plain.safetensors"
    state = read_checkpoint(toy_model["model"]).state_dict
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))  # no metadata: no trigger recorded
    result = runner.invoke(
        app,
        [
            "purify",
            str(plain),
            "--arch",
            "test_tiny",
            "--data",
            str(toy_model["data"]),
            "--out",
            str(tmp_path / "o"),
            "--method",
            "ft",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--require-verified",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["removal"]["verdict"] == "not_verified" and report["trigger"] is None
    assert (tmp_path / "o" / "report.json").exists()  # a failed gate still writes everything


@pytest.mark.parametrize("untriggered", [0, 30, 60])
def test_the_untriggered_rate_is_evidence_and_never_changes_the_verdict(untriggered):
    """A purified model that sends 6.7% of the images to the target untriggered and 7.8% triggered: the reason
    says what the trigger adds, and the verdict is the same as without the figure (the bounds are on the ASR)."""
    plain = judge_removal(TRIGGER, Rate(880, 900), Rate(70, 900))
    shown = judge_removal(TRIGGER, Rate(880, 900), Rate(70, 900), Rate(untriggered, 900))
    assert shown.verdict == plain.verdict == "not_verified"
    assert shown.evidence["asr_no_trigger_after"]["k"] == untriggered
    assert f"the trigger itself adds {(70 - untriggered) / 9:.1f} points" in shown.reason
    assert "asr_no_trigger_after" not in plain.evidence
