"""Verdicts: whether a purification removed the backdoor - the removal verdict and the retuning check.

- removal: verified / not_verified / failed, with the evidence each rests on
- retune: a copy retuned with a few poisoned images, and whether the backdoor comes back
"""

from .removal import FAILED_ASR, VERIFIED_ASR, combine_verdicts, judge_removal, judge_removal_by_scan
from .retune import RetuneResult, RetuneSettings, check_retuning, judge

__all__ = [
    "FAILED_ASR",
    "RetuneResult",
    "RetuneSettings",
    "VERIFIED_ASR",
    "check_retuning",
    "combine_verdicts",
    "judge",
    "judge_removal",
    "judge_removal_by_scan",
]
