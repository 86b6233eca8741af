"""Rates with their counts and 95% Wilson intervals, and the defense effectiveness rating (DER).

A rate is reported as k/n with an interval rather than as a bare percentage: "ASR 0.4%" means
little on 50 images and a lot on 9,000, and the interval says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. Unlike the normal approximation it stays
    inside [0, 1] and is sensible at k = 0 or k = n, which is exactly where ASR lives."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At the boundaries the exact bound is 0 or 1; float rounding would leave 1e-17 otherwise.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """k of n, as a value with its 95% Wilson interval. n = 0 gives value 0 and interval [0, 1]."""

    k: int
    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "n", int(self.n))
        if self.n < 0 or not 0 <= self.k <= max(self.n, 0):
            raise ValueError(f"invalid rate {self.k}/{self.n}")

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else 0.0

    @property
    def low(self) -> float:
        return wilson_interval(self.k, self.n)[0]

    @property
    def high(self) -> float:
        return wilson_interval(self.k, self.n)[1]

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "n": self.n,
            "value": round(self.value, 6),
            "ci95": [round(self.low, 6), round(self.high, 6)],
        }


# Below this multiple of chance (its 95% upper bound), an accuracy says the model does not do the task at all:
# a model fed the wrong way (convert refuses it), or a training run that did not learn (train warns).
CHANCE_MULTIPLE = 1.5


def at_chance(accuracy: Rate, num_classes: int) -> bool:
    """Whether `accuracy` is indistinguishable from guessing: even its 95% upper bound is within
    CHANCE_MULTIPLE x chance (1 / num_classes)."""
    return accuracy.high <= CHANCE_MULTIPLE / num_classes


def defense_effectiveness_rating(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2 in [0, 1] (BackdoorBench's definition):
    1 is a perfect defense (ASR removed, no accuracy lost), 0.5 changed nothing."""
    d_asr = max(0.0, asr_before - asr_after)
    d_acc = max(0.0, acc_before - acc_after)
    return (d_asr - d_acc + 1.0) / 2.0
