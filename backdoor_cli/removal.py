"""The removal verdict of a purify: is there evidence that the backdoor is gone?

A purify that exits 0 must not read as "the backdoor is gone" when nothing checked it. The verdict is
one of three, each with the evidence it rests on (report.json `removal`, report.md, the terminal):
- `verified`: a trigger that worked on the input (ASR above FAILED_ASR before) no longer does: its ASR
  after is at most VERIFIED_ASR with the upper 95% bound at most VERIFIED_HIGH. This speaks for that
  trigger only, which the reason says.
- `failed`: the trigger still works: ASR after above FAILED_ASR. Never `verified` above it.
- `not_verified`: nothing to check against (no trigger was given or recorded; blend, warp and
  sample-specific triggers can also hide from trigger inversion), or the trigger did not work on the
  input to begin with, or the ASR after lies between the two bounds.
`--require-verified` turns anything but `verified` into exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .metrics import Rate

VERIFIED_ASR = 0.05
VERIFIED_HIGH = 0.10
FAILED_ASR = 0.20
VERDICTS = ("verified", "not_verified", "failed")


@dataclass(frozen=True)
class RemovalVerdict:
    verdict: str  # one of VERDICTS
    reason: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "evidence": self.evidence}


def _rate(rate: Rate) -> dict:
    return {"k": rate.k, "n": rate.n, "value": rate.value, "ci95": [rate.low, rate.high]}


def judge_removal(trigger: dict | None, asr_before: Rate | None, asr_after: Rate | None) -> RemovalVerdict:
    """The verdict from the trigger's ASR before and after (the test set's triggered images)."""
    thresholds = {"verified_asr": VERIFIED_ASR, "verified_high": VERIFIED_HIGH, "failed_asr": FAILED_ASR}
    if trigger is None or asr_before is None or asr_after is None:
        return RemovalVerdict("not_verified", "no trigger to test the removal against: pass the suspected trigger "
                              "(--trigger), or look for one with `bdclean scan`; a purify without one cannot say "
                              "whether the backdoor is gone", {"trigger": None, "thresholds": thresholds})
    evidence = {"trigger": {k: trigger.get(k) for k in ("type", "target") if k in trigger},
                "asr_before": _rate(asr_before), "asr_after": _rate(asr_after), "thresholds": thresholds}
    target = trigger.get("target")
    if asr_before.value <= FAILED_ASR:
        return RemovalVerdict("not_verified", f"the given trigger sent only {asr_before.value:.1%} of the input's "
                              f"images to class {target}: it is not a working backdoor of this model, so its ASR "
                              "after purification says nothing about removal", evidence)
    if asr_after.value > FAILED_ASR:
        return RemovalVerdict("failed", f"the trigger still works: ASR {asr_after.value:.1%} after purification "
                              f"(from {asr_before.value:.1%}), above {FAILED_ASR:.0%}", evidence)
    if asr_after.value <= VERIFIED_ASR and asr_after.high <= VERIFIED_HIGH:
        return RemovalVerdict("verified", f"this trigger's ASR fell from {asr_before.value:.1%} to "
                              f"{asr_after.value:.1%} (95% upper bound {asr_after.high:.1%}); other triggers "
                              "were not tested", evidence)
    return RemovalVerdict("not_verified", f"ASR {asr_after.value:.1%} after purification (upper bound "
                          f"{asr_after.high:.1%}) is neither clearly gone (<= {VERIFIED_ASR:.0%}, bound <= "
                          f"{VERIFIED_HIGH:.0%}) nor clearly there (> {FAILED_ASR:.0%})", evidence)
