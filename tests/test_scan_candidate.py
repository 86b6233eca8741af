"""A candidate below the flagging threshold that a clean reference vouches for (scanning.guided): with no class
flagged, the smallest mask's class is unlearnt when the clean reference ignores its reconstruction, left alone
when the reference follows it, and never makes a scan-only `verified`."""

from __future__ import annotations

from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.scanning.guided import (
    CANDIDATE_INDEX,
    NATURAL_RATE,
    ReferenceCheck,
    candidate_below_threshold,
    vouch_for_candidate,
)
from backdoor_cli.verdicts.removal import judge_removal_by_scan
from helpers import scan_result as _result


def _check(rate: Rate, accuracy: float = 0.9) -> ReferenceCheck:
    return ReferenceCheck("ref.safetensors", {1: rate}, accuracy=accuracy, input_accuracy=0.92)


def test_the_candidate_is_the_smallest_mask_that_stands_out_and_only_when_nothing_is_flagged():
    assert candidate_below_threshold(_result([0.1, 1.73, -0.4, 0.9])).target == 1
    assert candidate_below_threshold(_result([0.1, CANDIDATE_INDEX - 0.01, -0.4])) is None  # nothing stands out
    assert candidate_below_threshold(_result([0.1, 3.5, -0.4], flagged=[1])) is None  # a flag decides instead
    # with a pre-screen, a class searched only briefly is never the candidate
    screened = _result([0.1, 1.9, 1.5, 0.0], candidates=[2], reference=[0, 3])
    assert candidate_below_threshold(screened).target == 2


def test_a_candidate_the_reference_ignores_is_unlearnt_as_the_models_own():
    result = _result([0.1, 1.73, -0.4])
    chosen, why = vouch_for_candidate(result.triggers[1], result, _check(Rate(15, 180)))
    assert [t.target for t in chosen] == [1]
    assert "anomaly index 1.73 <= 2" in why and "only 8.3%" in why and f"below {NATURAL_RATE:.0%}" in why
    assert "unlearnt" in why and "cannot say verified" in why


def test_a_candidate_the_reference_follows_is_a_shortcut_left_alone():
    result = _result([0.1, 1.73, -0.4])
    chosen, why = vouch_for_candidate(result.triggers[1], result, _check(Rate(99, 180)))
    assert chosen == [] and "follows its reconstruction too (55.0%)" in why and "nothing was unlearnt" in why


def test_a_weak_reference_vouches_for_no_candidate():
    result = _result([0.1, 1.73, -0.4])
    chosen, why = vouch_for_candidate(result.triggers[1], result, _check(Rate(0, 180), accuracy=0.3))
    assert chosen == [] and "too weak a model of the task" in why and "nothing was unlearnt" in why


def test_an_unlearnt_candidate_never_verifies_by_the_scan():
    """Gone by its proxy ASR, and still `not_verified`: a guess below the outlier test shows nothing."""
    verdict = judge_removal_by_scan([], [1], {1: Rate(170, 180)}, {1: Rate(0, 180)}, {}, planted={1: Rate(5, 180)})
    assert verdict.verdict == "not_verified"
    assert "a candidate, not a finding" in verdict.reason and "94.4%" in verdict.reason and "0.0%" in verdict.reason
