"""The removal verdict of a purify: is there evidence that the backdoor is gone?

A purify that exits 0 must not read as "the backdoor is gone" when nothing checked it. The verdict is
one of three, each with the evidence it rests on (report.json `removal`, report.md, the terminal):
- `verified`: a trigger that worked on the input (ASR above FAILED_ASR before) no longer does: its ASR
  after is at most VERIFIED_ASR with the upper 95% bound at most VERIFIED_HIGH. This speaks for that
  trigger only, which the reason says. Without a known trigger, the scan's single flagged class whose
  reconstruction a clean reference ignores (the model's own trigger) stands for it (judge_removal_by_scan).
- `failed`: the trigger still works: ASR after above FAILED_ASR. Never `verified` above it.
- `not_verified`: nothing to check against (no trigger was given or recorded; blend, SIG, warp and
  sample-specific triggers can also hide from trigger inversion), or the trigger did not work on the
  input to begin with, or the ASR after lies between the two bounds.
`--require-verified` turns anything but `verified` into exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation.metrics import Rate
from ..scanning.guided import LOCAL_SHARE, local_share

VERIFIED_ASR = 0.05
VERIFIED_HIGH = 0.10
FAILED_ASR = 0.20
VERDICTS = ("verified", "not_verified", "failed")


# When the scan found nothing to remove, the one way bdclean has to remove a trigger it cannot reconstruct: a
# trigger-free method, at its price. Measured (docs/purification.md, twelfth session): FST removed the SIG and
# WaNet subjects the default left, at 6.8-25.4 points of clean accuracy (2,000 test images).
TRIGGER_FREE_FALLBACK = (
    ", or run a method that needs no trigger, such as --method fst (it removed the SIG and WaNet backdoors the "
    "scan missed, at 7-25 points of clean accuracy)"
)
# What a verdict with nothing found to check against says of the triggers the scan cannot see, and what to do.
HIDDEN_TRIGGERS = (
    "(blend, SIG, warp and sample-specific triggers can hide from trigger inversion; pass --trigger if you suspect "
    f"one{TRIGGER_FREE_FALLBACK})"
)


@dataclass(frozen=True)
class RemovalVerdict:
    verdict: str  # one of VERDICTS
    reason: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "evidence": self.evidence}


def _rate(rate: Rate) -> dict:
    return {"k": rate.k, "n": rate.n, "value": rate.value, "ci95": [rate.low, rate.high]}


def judge_removal(
    trigger: dict | None, asr_before: Rate | None, asr_after: Rate | None, untriggered_after: Rate | None = None
) -> RemovalVerdict:
    """The verdict from the trigger's ASR before and after (the test set's triggered images). `untriggered_after`
    (the same images without the trigger, on the purified model) decides nothing: it is shown as evidence and,
    where the ASR is between the bounds, says how much of it the trigger itself adds."""
    thresholds = {"verified_asr": VERIFIED_ASR, "verified_high": VERIFIED_HIGH, "failed_asr": FAILED_ASR}
    if trigger is None or asr_before is None or asr_after is None:
        return RemovalVerdict(
            "not_verified",
            "no trigger to test the removal against: pass the suspected trigger "
            "(--trigger), or look for one with `bdclean scan`; a purify without one cannot say "
            "whether the backdoor is gone",
            {"trigger": None, "thresholds": thresholds},
        )
    evidence = {
        "trigger": {k: trigger.get(k) for k in ("type", "target") if k in trigger},
        "asr_before": _rate(asr_before),
        "asr_after": _rate(asr_after),
        "thresholds": thresholds,
    }
    if untriggered_after is not None:
        evidence["asr_no_trigger_after"] = _rate(untriggered_after)
    target = trigger.get("target")
    if asr_before.value <= FAILED_ASR:
        return RemovalVerdict(
            "not_verified",
            f"the given trigger sent only {asr_before.value:.1%} of the input's "
            f"images to class {target}: it is not a working backdoor of this model, so its ASR "
            "after purification says nothing about removal",
            evidence,
        )
    if asr_after.value > FAILED_ASR:
        return RemovalVerdict(
            "failed",
            f"the trigger still works: ASR {asr_after.value:.1%} after purification "
            f"(from {asr_before.value:.1%}), above {FAILED_ASR:.0%}",
            evidence,
        )
    if asr_after.value <= VERIFIED_ASR and asr_after.high <= VERIFIED_HIGH:
        return RemovalVerdict(
            "verified",
            f"this trigger's ASR fell from {asr_before.value:.1%} to "
            f"{asr_after.value:.1%} (95% upper bound {asr_after.high:.1%}); other triggers "
            "were not tested",
            evidence,
        )
    return RemovalVerdict(
        "not_verified",
        f"ASR {asr_after.value:.1%} after purification (upper bound "
        f"{asr_after.high:.1%}) is neither clearly gone (<= {VERIFIED_ASR:.0%}, bound <= "
        f"{VERIFIED_HIGH:.0%}) nor clearly there (> {FAILED_ASR:.0%})"
        + _untriggered_words(asr_after, untriggered_after),
        evidence,
    )


def _untriggered_words(asr_after: Rate, untriggered_after: Rate | None) -> str:
    if untriggered_after is None:
        return ""
    lift = (asr_after.value - untriggered_after.value) * 100
    return (
        f"; without the trigger the purified model sends {untriggered_after.value:.1%} of the same images there, "
        f"so the trigger itself adds {lift:.1f} points"
    )


def judge_removal_by_scan(
    flagged: list[int],
    unlearnt: list[int],
    proxy_before: dict[int, Rate],
    proxy_after: dict[int, Rate],
    rescan: dict[int, dict],
    natural: dict[int, Rate] | None = None,
    planted: dict[int, Rate] | None = None,
    local: dict[int, Rate] | None = None,
    dormant: dict[int, Rate] | None = None,
    dormancy: dict | None = None,
) -> RemovalVerdict:
    """The verdict without a known trigger, from the scan that guided the purify. `flagged`: the classes
    taken for planted triggers; `natural`: flagged classes a clean reference follows too (set aside);
    `planted`: flagged classes whose reconstruction a (competent) clean reference ignores, with its rate;
    `local`: each unlearnt reconstruction's proxy ASR on the input when cut to its densest window
    (scanning.guided.localize): a trigger-free `verified` also needs the reconstruction to be local. `dormant`:
    unlearnt classes whose reconstruction retuning brings back on the output (verdicts/dormancy.py), with the
    rate it comes back to: a backdoor that comes back is still there, so `failed`; `dormancy`: that check's record.

    The scan can show that what it found is gone: every flagged class's proxy ASR at most VERIFIED_ASR,
    upper bound at most VERIFIED_HIGH, and a re-scan that no longer flags it or finds a trigger the clean
    reference follows too, the data's shortcut to the class (evidence["found_trigger_removed"]). That is
    `verified` only when exactly one class was flagged and a clean reference showed its reconstruction to be the model's own (in `planted`): without a reference the scan
    cannot tell a planted trigger from a shortcut of the data, and a SIG backdoor hid behind a removed
    shortcut. `failed` when the reconstruction still works (above FAILED_ASR) or the re-scan still flags the
    class with a trigger the clean reference ignores; a re-scan flag no reference tested is `not_verified`
    (the backdoor or the data's shortcut); `not_verified` otherwise, with the reason."""
    thresholds = {"verified_asr": VERIFIED_ASR, "verified_high": VERIFIED_HIGH, "failed_asr": FAILED_ASR}
    evidence = {
        "source": "scan",
        "found_trigger_removed": False,
        "flagged": list(flagged),
        "unlearnt": list(unlearnt),
        "proxy_asr_before": {str(c): _rate(r) for c, r in proxy_before.items()},
        "proxy_asr_after": {str(c): _rate(r) for c, r in proxy_after.items()},
        "rescan": {str(c): v for c, v in rescan.items()},
        "thresholds": thresholds,
    }
    if dormancy is not None:
        evidence["dormancy"] = dormancy
    if natural:
        evidence["natural_shortcuts"] = {str(c): _rate(r) for c, r in natural.items()}
    if planted:
        evidence["reference_rates"] = {str(c): _rate(r) for c, r in planted.items()}
    if local:
        evidence["local_share"] = {
            str(c): round(local_share(r, proxy_before[c]), 4) for c, r in local.items() if c in proxy_before
        }
        evidence["thresholds"]["local_share"] = LOCAL_SHARE
    if not flagged and natural:
        shared = "; ".join(
            f"class {c}: its reconstruction sends {r.value:.1%} of the clean reference's images there"
            for c, r in natural.items()
        )
        return RemovalVerdict(
            "not_verified",
            f"the scan flagged only shortcuts the clean reference shares ({shared}), so no planted trigger was "
            f"found to remove or verify against {HIDDEN_TRIGGERS}",
            evidence,
        )
    if not flagged:
        moved = "; ".join(
            f"class {c}: its reconstructed trigger sent {proxy_before[c].value:.1%} of held-out images "
            f"there before and {proxy_after[c].value:.1%} after"
            for c in unlearnt
            if c in proxy_before and c in proxy_after
        )
        # A class unlearnt without a flag (--precaution, or a candidate the clean reference vouched for) is a
        # guess below the outlier test: its reconstruction going away cannot show that a backdoor is gone.
        return RemovalVerdict(
            "not_verified",
            f"the scan flagged no class, so there was nothing to verify the removal against {HIDDEN_TRIGGERS}"
            + (
                f"; the class unlearnt below the flagging threshold is a candidate, not a finding: {moved}"
                if moved
                else ""
            ),
            evidence,
        )
    # An all-to-one backdoor has one target: with several classes flagged, some are shortcuts of the data or
    # the model rather than a backdoor, and the scan cannot tell which. Measured: a clean softmax MNIST CNN had
    # 3 classes flagged; a SIG-trigger ResNet-20 (target 0) had classes 4 and 6 flagged and not 0, and after
    # unlearning them its true ASR was still 71.9%. So several flagged classes never make a `verified`.
    several = (
        f"; {len(flagged)} classes were flagged, and an all-to-one backdoor has one target, so some are "
        "shortcuts of the data rather than a backdoor, and the scan cannot tell which"
        if len(flagged) > 1
        else ""
    )
    # The re-scan's flag is evidence of a trigger left only when a clean reference ignores the re-scanned
    # trigger; one it follows too is the data's shortcut to the class (shortcut: true), and without a reference
    # the two cannot be told apart (measured: a patch-trigger ResNet-56 whose true ASR fell to 2.1% had class 0
    # re-flagged at anomaly index 2.20, the airplane shortcut its clean parent is flagged for by every scan).
    planted_again = [c for c in flagged if rescan.get(c, {}).get("flagged") and rescan[c].get("shortcut") is False]
    dormant = dormant or {}
    still = [c for c in flagged if proxy_after[c].value > FAILED_ASR or c in planted_again or c in dormant]
    if still:
        parts = [
            f"class {c}: proxy ASR {proxy_after[c].value:.1%}"
            + (
                ", the re-scan still flags it and the clean reference ignores the re-scanned trigger"
                if c in planted_again
                else ""
            )
            + (
                f", and retuning with 5 images stamped with its reconstruction, made opaque, brings it back to "
                f"{dormant[c].value:.1%} (dormant)"
                if c in dormant
                else ""
            )
            for c in still
        ]
        return RemovalVerdict(
            "failed", "the backdoor the scan found is still there (" + "; ".join(parts) + ")" + several, evidence
        )
    untested = [c for c in flagged if rescan.get(c, {}).get("flagged") and "shortcut" not in rescan[c]]
    if untested:
        parts = [
            f"class {c}: proxy ASR {proxy_after[c].value:.1%}, but the re-scan still finds a small trigger "
            f"(mask L1 {rescan[c]['mask_l1']:g}, anomaly index {rescan[c]['anomaly_index']:.2f})"
            for c in untested
        ]
        return RemovalVerdict(
            "not_verified",
            "; ".join(parts) + ": the backdoor, or the data's own shortcut to the class, which only a clean "
            "reference (--clean-reference) can tell apart" + several,
            evidence,
        )
    gone = [
        c
        for c in flagged
        if proxy_after[c].value <= VERIFIED_ASR
        and proxy_after[c].high <= VERIFIED_HIGH
        and c in rescan
        and (not rescan[c]["flagged"] or rescan[c].get("shortcut") is True)
    ]
    if len(gone) == len(flagged):
        evidence["found_trigger_removed"] = True
        parts = [
            f"class {c}: proxy ASR {proxy_before[c].value:.1%} -> {proxy_after[c].value:.1%} (upper bound "
            f"{proxy_after[c].high:.1%}), re-scanned mask L1 {rescan[c]['input_mask_l1']:g} -> "
            f"{rescan[c]['mask_l1']:g}, "
            + (
                "no longer an outlier"
                if not rescan[c]["flagged"]
                else f"still small, but the clean reference follows it too ({rescan[c]['reference_rate']['value']:.1%}):"
                " the data's shortcut to the class"
            )
            for c in flagged
        ]
        found = "the trigger the scan found is gone (" + "; ".join(parts) + ")"
        if len(flagged) == 1 and planted and flagged[0] in planted:
            # One flagged class, and a clean model of the task ignores its reconstruction: the model's own
            # trigger, not a shortcut of the data. The SIG failure below needed a shortcut to be taken for the
            # backdoor; the reference sets shortcuts aside (the SIG model's flags sent 72-82% of a clean
            # model's images to their class, planted triggers' reconstructions 5-21%).
            c = flagged[0]
            rate = planted[c]
            planted_found = (
                f"{found}; the clean reference sends only {rate.value:.1%} of its images there with it, so it was "
                "this model's planted trigger, not a shortcut of the data"
            )
            share = local_share(local[c], proxy_before[c]) if local and c in local and c in proxy_before else None
            if share is None or share < LOCAL_SHARE:
                # A spread-out reconstruction approximates a trigger the inversion cannot represent (a blend,
                # a signal, a warp): removing it left a blend ResNet-20's true trigger at 22.2%.
                measured = (
                    f"its densest window keeps only {share:.0%} of its proxy ASR, below {LOCAL_SHARE:.0%}"
                    if share is not None
                    else "how local it is was not measured"
                )
                return RemovalVerdict(
                    "not_verified",
                    f"{planted_found}. But the reconstruction is spread over the image ({measured}): it "
                    "approximates a trigger that trigger inversion cannot represent exactly (a blend, a signal, a "
                    "warp), and removing the approximation does not show the trigger is gone (a blend ResNet-20 "
                    "kept 22.2% true ASR after its reconstruction was gone). Pass --trigger when you know it",
                    evidence,
                )
            return RemovalVerdict(
                "verified",
                f"{planted_found}, and a local one (its densest window keeps {share:.0%} of its proxy ASR), which "
                "trigger inversion reproduces. This speaks for the reconstruction, which approximates the trigger "
                "(pass --trigger when you know it); a second trigger that hides from inversion (blend, SIG, warp, "
                "sample-specific) was not tested",
                evidence,
            )
        # Without a reference the scan alone never says `verified`: measured on a SIG-trigger ResNet-20 (target
        # 0) with fresh clean data, the scan flagged class 6 only, its reconstruction was unlearnt (proxy ASR
        # 3.9%, the re-scan no longer flagged it), and the true trigger still worked on 83.3% of images.
        return RemovalVerdict(
            "not_verified",
            found + several + "; but without a clean reference the scan cannot tell a planted trigger from a "
            "shortcut of the data, and a trigger that hides from inversion (blend, SIG, warp, sample-specific) "
            "cannot be ruled out: pass --trigger, or --clean-reference (a clean model of the same task), to verify",
            evidence,
        )
    return RemovalVerdict(
        "not_verified",
        "the scan's reconstructed trigger works less than before but not clearly "
        "not at all: "
        + "; ".join(
            f"class {c}: proxy ASR {proxy_after[c].value:.1%} (upper bound {proxy_after[c].high:.1%})" for c in flagged
        ),
        evidence,
    )


def with_co_flags_left(verdict: RemovalVerdict, left: dict) -> RemovalVerdict:
    """The scan's verdict when flagged classes were left out of the unlearning because unlearning them cost too much
    (`left`: the co-flag trial, selection/co_flags.py). A class left out is not shown gone, so the verdict is then
    never `verified`: `not_verified` where the rest was; any other verdict keeps its word. Either way the classes
    left and their proxy ASR on the output are named."""
    evidence = {**verdict.evidence, "co_flags_left": left}
    without = sorted(left["proxy_asr_without"].items(), key=lambda item: int(item[0]))  # JSON keys: class numbers
    rates = ", ".join(f"class {c} {r['value']:.1%}" for c, r in without)
    words = (
        f"; class {', '.join(str(c) for c in left['classes'])} was flagged too, weakly and spread out, and left out "
        f"of the unlearning because unlearning it cost the held-out images {left['without_acc'] - left['with_acc']:.1%} "
        f"more (its reconstruction's proxy ASR on the output: {rates}): the scan cannot say it was a shortcut of the "
        "data and not a second backdoor"
    )
    outcome = "not_verified" if verdict.verdict == "verified" else verdict.verdict
    return RemovalVerdict(outcome, verdict.reason + words, evidence)


def combine_verdicts(by_trigger: RemovalVerdict, by_scan: RemovalVerdict | None) -> RemovalVerdict:
    """With --trigger the given trigger decides; the scan's evidence is kept beside it. Only a scan that
    says `failed` overrides a `verified`: a second backdoor is still a backdoor."""
    if by_scan is None:
        return by_trigger
    # the scan's own verdict stays in the report: what the trigger-free default concluded by itself
    evidence = {
        **by_trigger.evidence,
        "scan": {"verdict": by_scan.verdict, "reason": by_scan.reason, **by_scan.evidence},
    }
    if by_trigger.verdict == "verified" and by_scan.verdict == "failed":
        return RemovalVerdict("failed", f"{by_trigger.reason}; but {by_scan.reason}", evidence)
    return RemovalVerdict(by_trigger.verdict, by_trigger.reason, evidence)
