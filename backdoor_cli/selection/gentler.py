"""A gentler second unlearning when the first cost the held-out images too much (the default only).

The default unlearns at the dataset's rate (lr 0.01 for CIFAR-10) and keeps the last epoch: on clean
images drawn from the training split the held-out accuracy is that of memorised images and cannot pick
an epoch (selection/recipe.py). It can still see a collapse. A VGG-16-BN (85.9%, trained at lr 0.01 with a
warm-up; planting at 0.01 diverged) lost 11.5 points of held-out accuracy (91.0% -> 79.5%) and 6.25 of
test accuracy under the default's unlearning; on every ResNet cell measured before, the held-out images
moved by -4.0 to +5.5 points (docs/purification.md). So a fall of more than GENTLER_DROP asks for one more
run from the input's weights at a third of the rate, and the gentler result is kept when it still removes
what the scan found (the reconstruction's proxy ASR on the held-out images within the removal verdict's
5%, 95% upper bound within 10%) and costs the held-out images less; otherwise the first is kept and
the report says why. The test set and the true trigger play no part.

The fall shows sooner than the last epoch: after the first epoch the held-out images of 29 logged ResNet runs
(ResNet-20/32/56, both clean-data protocols) had moved by -7.0 to +7.5 points, those of the five VGG-16-BN runs
at lr 0.01 had fallen 19.0 to 25.0 (10.0 at lr 0.003). So a first-epoch fall of more than FIRST_EPOCH_DROP
stops the run there and starts the gentler one at once: the VGG on fresh images fell 19.0 points after its
first epoch but recovered to a 7.5-point fall by the last, under GENTLER_DROP, and cost 9 points of test
accuracy; and the stopped run's nine other epochs are not spent. A gentler run that does not remove what the
scan found (or costs more than the stopped epoch) sends the default back to its own rate, run in full.

Where neither run removes what the scan found (a false flag's spread-out reconstruction, which no rate unlearns
away), the default's rate has bought nothing the evidence shows: the gentler run is kept when it is no worse on
any class (GentlerRun.neither_removes) and costs less.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation.metrics import Rate

GENTLER_DROP = 0.08  # held-out accuracy fall (input minus last epoch) that asks for a gentler run
FIRST_EPOCH_DROP = 0.12  # held-out accuracy fall after the first epoch that stops the run for a gentler one
GENTLER_FACTOR = 1 / 3  # the gentler run's rate, as a share of the first's
PROXY_REMOVED = 0.05  # the removal verdict's bounds (verdicts/removal.py), on the reconstruction's proxy ASR
PROXY_REMOVED_HIGH = 0.10


def needs_gentler(input_acc: float, last_acc: float) -> bool:
    return input_acc - last_acc > GENTLER_DROP + 1e-9  # accuracies are ratios of counts


def too_hot(input_acc: float, first_epoch_acc: float) -> bool:
    """Whether the first epoch's held-out fall stops the run (FIRST_EPOCH_DROP)."""
    return input_acc - first_epoch_acc > FIRST_EPOCH_DROP + 1e-9


def removed(proxy: dict[int, Rate]) -> bool:
    """Whether every reconstruction's proxy ASR is within the removal verdict's bounds."""
    return all(r.value <= PROXY_REMOVED and r.high <= PROXY_REMOVED_HIGH for r in proxy.values())


@dataclass
class GentlerRun:
    """The default's rate and the gentler one, both measured on the held-out images, and which was kept.

    `cause` is what asked for the gentler run: "last_epoch" (the first run, done in full, fell more than
    GENTLER_DROP) or "first_epoch" (it fell more than FIRST_EPOCH_DROP after one epoch and was stopped there,
    `stopped_acc`). After a stop, `first_acc` and `first_proxy` exist only when the gentler run was not kept
    and the default's rate was then run in full."""

    input_acc: float
    first_lr: float
    first_acc: float | None
    first_proxy: dict[int, Rate] | None
    lr: float
    acc: float
    proxy: dict[int, Rate]
    curve: list[dict] = field(default_factory=list)
    cause: str = "last_epoch"
    stopped_acc: float | None = None
    first_curve: list[dict] = field(default_factory=list)  # the first run's held-out curve (one epoch if stopped)

    @property
    def neither_removes(self) -> bool:
        """Neither run removes what the scan found, and the gentler run is no worse on any class than the run at
        the default's rate (its proxy ASR within that run's 95% upper bound): the default's rate bought no removal
        the evidence shows. Measured: a false flag's spread-out reconstruction on the second VGG-16-BN (fresh
        images, seed 1) read 7.2% after the gentler run and 5.6% (upper bound 9.9%) after the full one, which
        cost the held-out images 2.5 points more and the test set 7.02 points in all (twenty-first session)."""
        if self.first_proxy is None or removed(self.proxy) or removed(self.first_proxy):
            return False
        return all(c in self.first_proxy and r.value <= self.first_proxy[c].high for c, r in self.proxy.items())

    @property
    def kept_gentler(self) -> bool:
        if removed(self.proxy):
            bar = self.stopped_acc if self.cause == "first_epoch" else self.first_acc
            return self.acc > bar
        return self.neither_removes and self.acc > self.first_acc

    def _first_words(self) -> str:
        proxy = ", ".join(
            f"class {c} {r.value:.1%} (upper bound {r.high:.1%})" for c, r in sorted(self.first_proxy.items())
        )
        return f"{self.first_acc:.1%}, proxy ASR {proxy}"

    def reason(self) -> str:
        proxy = ", ".join(f"class {c} {r.value:.1%}" for c, r in sorted(self.proxy.items()))
        if self.cause == "first_epoch":
            head = (
                f"the unlearning at lr {self.first_lr:g} cost the held-out images "
                f"{self.input_acc - self.stopped_acc:.1%} in its first epoch ({self.input_acc:.1%} -> "
                f"{self.stopped_acc:.1%}, more than {FIRST_EPOCH_DROP:.0%}), so it was stopped and run from the "
                f"input at lr {self.lr:g}: {self.acc:.1%}, proxy ASR {proxy}"
            )
            if self.kept_gentler and self.neither_removes:
                return head + (
                    f"; it did not remove what the scan found, so the unlearning was run in full at lr "
                    f"{self.first_lr:g} ({self._first_words()}), which did not either: the gentler run is kept (no "
                    "worse on any class, at less cost)"
                )
            if self.kept_gentler:
                return head + "; the gentler run is kept (what the scan found is removed)"
            why = "it did not remove what the scan found" if not removed(self.proxy) else "it cost more"
            full = f" ({self.first_acc:.1%})" if self.first_acc is not None else ""
            return head + f"; {why}, so the unlearning was run in full at lr {self.first_lr:g} and is kept{full}"
        head = (
            f"the unlearning at lr {self.first_lr:g} cost the held-out images {self.input_acc - self.first_acc:.1%} "
            f"({self.input_acc:.1%} -> {self.first_acc:.1%}, more than {GENTLER_DROP:.0%}), so it was run again "
            f"from the input at lr {self.lr:g}: {self.acc:.1%}, proxy ASR {proxy}"
        )
        if self.kept_gentler and self.neither_removes:
            return head + (
                f"; neither run removed what the scan found (the first: {self._first_words()}), and the gentler one is "
                "no worse on any class: the gentler run is kept (at less cost)"
            )
        if self.kept_gentler:
            return head + "; the gentler run is kept (what the scan found is still removed, at less cost)"
        why = "it did not remove what the scan found" if not removed(self.proxy) else "it cost no less"
        return head + f"; the first run is kept ({why})"

    def to_dict(self) -> dict:
        return {
            "cause": self.cause,
            "threshold": GENTLER_DROP,
            "first_epoch_threshold": FIRST_EPOCH_DROP,
            "input_acc": round(self.input_acc, 6),
            "first": {
                "lr": self.first_lr,
                "stopped_after_first_epoch": self.cause == "first_epoch",
                "stopped_holdout_acc": round(self.stopped_acc, 6) if self.stopped_acc is not None else None,
                "holdout_acc": round(self.first_acc, 6) if self.first_acc is not None else None,
                "proxy_asr": (
                    {str(c): r.to_dict() for c, r in self.first_proxy.items()} if self.first_proxy is not None else None
                ),
                "curve": self.first_curve,
            },
            "gentler": {
                "lr": self.lr,
                "holdout_acc": round(self.acc, 6),
                "proxy_asr": {str(c): r.to_dict() for c, r in self.proxy.items()},
                "curve": self.curve,
            },
            "kept": "gentler" if self.kept_gentler else "first",
            "reason": self.reason(),
        }


# A class unlearnt without a flag (the candidate a clean reference vouched for) is a guess below the outlier
# test; a guess must be cheap. Measured: the three backdoors found this way cost the held-out images nothing
# (held-out accuracy +0.5, 0.0 and +2.0 points after unlearning), while a clean VGG-16-BN's candidate (anomaly
# index 1.02, which the clean ResNet-20 ignored: 19.4%) cost them 3.5 points even after the gentler rerun, and
# 2.95 points of test accuracy. So unlearning a candidate that costs the held-out images more than this is
# undone, and the input is written back unchanged. Fit to these four cells (eighth session).
CANDIDATE_COST = 0.02


def candidate_too_costly(input_acc: float, acc: float) -> bool:
    return input_acc - acc > CANDIDATE_COST + 1e-9
