"""metrics.py: Wilson intervals against known values, Rate, and DER."""

from __future__ import annotations

import pytest

from backdoor_cli.evaluation.metrics import Rate, defense_effectiveness_rating, wilson_interval


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # Reference values from the closed-form Wilson score interval (z = 1.959964), computed separately.
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (5, 10, 0.236593, 0.763407),
        (81, 263, 0.255289, 0.366210),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-5) and hi == pytest.approx(high, abs=1e-5)


def test_wilson_interval_narrows_with_n_and_contains_the_estimate():
    widths = []
    for n in (10, 100, 1000, 10000):
        lo, hi = wilson_interval(n // 10, n)
        assert lo <= 0.1 <= hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)


def test_rate():
    r = Rate(9, 10)
    assert r.value == 0.9 and r.low < 0.9 < r.high
    d = r.to_dict()
    assert d["k"] == 9 and d["n"] == 10 and d["value"] == 0.9 and len(d["ci95"]) == 2
    assert Rate(0, 0).value == 0.0 and (Rate(0, 0).low, Rate(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        Rate(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


@pytest.mark.parametrize(
    "acc_b, acc_a, asr_b, asr_a, der",
    [
        (0.9, 0.9, 1.0, 0.0, 1.0),  # perfect defense
        (0.9, 0.9, 0.5, 0.5, 0.5),  # nothing changed
        (0.9, 0.8, 1.0, 0.0, 0.95),  # ASR removed at 10 points of accuracy
        (0.8, 0.9, 0.2, 0.4, 0.5),  # gains in accuracy and rises in ASR are clipped at 0
    ],
)
def test_der(acc_b, acc_a, asr_b, asr_a, der):
    assert defense_effectiveness_rating(acc_b, acc_a, asr_b, asr_a) == pytest.approx(der)
