"""Whether to unlearn a co-flag: a weak, spread-out flag beside a strong one (scanning/guided.py CO_FLAG_SHARE).

An all-to-one backdoor has one target, so such a flag is likelier the data's shortcut to its class than a second
backdoor; unlearning a shortcut costs accuracy (adversarial training against a universal perturbation), unlearning a
planted trigger's reconstruction costs little (the backdoors found below the threshold cost the held-out images
nothing: CANDIDATE_COST). So a co-flag is held to a candidate's budget: where the unlearning with every flag cost the
held-out images more than CANDIDATE_COST, it is run again without the co-flags, and they are left out when that
spares the held-out images more than CANDIDATE_COST. Left out, they keep the scan's verdict from `verified`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation.metrics import Rate
from .gentler import CANDIDATE_COST


def worth_trying_without(input_acc: float, with_acc: float) -> bool:
    """Whether the unlearning with every flag cost the held-out images enough to try it without the co-flags."""
    return input_acc - with_acc > CANDIDATE_COST + 1e-9


@dataclass
class CoFlagTrial:
    """The unlearning with the co-flags and without them, on the same held-out images, and which was kept.
    `proxy_without`: the co-flags' proxy ASR after the run without them (what leaving them out leaves)."""

    classes: list[int]
    input_acc: float
    with_acc: float
    without_acc: float
    proxy_without: dict[int, Rate]
    # what the run with the co-flags said (its gentler-rate and dormancy notes): kept in the report when its
    # weights are not, so the evidence for leaving them out stays readable
    with_notes: list[str] = field(default_factory=list)

    @property
    def left_out(self) -> bool:
        """Left out when unlearning them cost the held-out images more than a guess may (CANDIDATE_COST)."""
        return self.without_acc - self.with_acc > CANDIDATE_COST + 1e-9

    def reason(self) -> str:
        classes = ", ".join(str(c) for c in self.classes)
        head = (
            f"class {classes} was flagged far more weakly than the strongest flag, with a spread-out reconstruction "
            f"(a co-flag: likelier the data's shortcut to the class than a second backdoor); the unlearning with it "
            f"cost the held-out images {self.input_acc - self.with_acc:.1%} ({self.input_acc:.1%} -> "
            f"{self.with_acc:.1%}), so it was run again without it: {self.without_acc:.1%}"
        )
        left = ", ".join(f"class {c} {r.value:.1%}" for c, r in sorted(self.proxy_without.items()))
        if self.left_out:
            return head + (
                f"; unlearning it cost more than the {CANDIDATE_COST:.0%} a guess may, so it is left out (its "
                f"reconstruction's proxy ASR on the output: {left}), and the scan cannot say the backdoor is gone"
            )
        return head + f"; it cost no more than {CANDIDATE_COST:.0%} beyond that, so the run with it is kept"

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "budget": CANDIDATE_COST,
            "input_acc": round(self.input_acc, 6),
            "with_acc": round(self.with_acc, 6),
            "without_acc": round(self.without_acc, 6),
            "proxy_asr_without": {str(c): r.to_dict() for c, r in self.proxy_without.items()},
            "with_notes": list(self.with_notes),
            "kept": "without" if self.left_out else "with",
            "reason": self.reason(),
        }
