"""Scan-guided purification: what the trigger inversion finds is what purify removes and checks.

    scan the tuning images (scan.scan_model) -> choose the classes to unlearn -> proxy ASR of their
    reconstructed triggers on the held-out images -> [tuning] -> proxy ASR again, and a re-scan of
    each flagged class on the purified model

The proxy ASR is the share of held-out clean images of other classes that the input's reconstructed
trigger sends to its class: the images were used neither to reconstruct it nor to tune. The re-scan
inverts the class again on the purified model: if the true trigger still worked, the search would find
a small mask again, so a re-scanned mask of typical size is evidence the shortcut itself is gone, not
only the one reconstruction that was unlearnt. Its anomaly index is measured against the input scan's
other classes (their masks are not searched again: that would cost a whole scan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..data.datasets import ImageSet
from ..evaluation.measure import top1_accuracy
from ..evaluation.metrics import Rate
from ..models.output_kind import LossAdapter, attach_loss
from ..progress import Reporter, step_callback
from .cache import ScanCache, scan_key
from .inversion import (
    MAD_CONSISTENCY,
    MIN_L1,
    ClassTrigger,
    InversionParams,
    ScanResult,
    count_hits,
    invert_classes,
    scan_model,
)

# A flagged class whose reconstructed trigger also sends at least this share of other classes' images to
# it on a clean reference model is a shortcut of the data, not a planted trigger, and is not unlearnt.
# Measured (docs/purification.md): planted triggers' reconstructions sent 5-11% of 2,000 test images to
# their class on clean ResNet-20/56 models, and 0-21.1% of 180 held-out images inside a purify (13 cells,
# patch and blend subjects); the natural shortcuts flagged on a clean ResNet-56 and on SIG models sent
# 41-82% (45.0% the closest, inside a purify). 35% lies between.
NATURAL_RATE = 0.35


# The reference must be a competent model of the task: a weak or wrongly normalised one follows no shortcut
# of the data, and every reconstruction would look planted to it. Its accuracy on the same held-out images
# may be at most this far below the input model's, or the check is reported and not used.
REFERENCE_MARGIN = 0.15
# A bundled reference tried on images that are not its built-in dataset (a user's own held-out CIFAR-10 images)
# must also show that they are its task's: at least this share of their labels right, five times chance for ten
# classes. A reference of another task (SVHN digits, classes in another order) gets about chance, while a weak
# input model would let the margin alone accept it (usecases/references.py).
TRIED_FLOOR = 0.5

# A mask-and-pattern inversion reproduces a local trigger (a patch) exactly; a trigger spread over the image
# (a blend, a signal, a warp) it can only approximate, and unlearning the approximation does not remove the
# trigger: measured, a blend ResNet-20 whose reconstruction was gone (proxy ASR 1.7%, re-scan not flagged)
# kept 22.2% true ASR (docs/purification.md, sixth session). So the trigger-free `verified` also asks that the
# reconstruction be local: cut to its densest square window of a quarter of the image's side, it must still
# send at least LOCAL_SHARE as many held-out images to its class as whole (measured on the input model: patch
# subjects kept 80-97%, blend subjects 4-36%).
LOCAL_WINDOW_FRACTION = 4  # the window's side: the image's shorter side // this
LOCAL_SHARE = 0.6

# Below the flagging threshold the smallest mask can still be the backdoor's: r20-patch4 at --seed 1 (class 0 at
# anomaly index 1.73, a 96.7% backdoor left in place), WaNet at s 1.0 (1.96), the blend ResNet-32 (1.34).
# Unlearning it anyway (--precaution) cost a clean ResNet-20 3.08 points, where it is a shortcut of the data.
# With a clean reference the two can be told apart: a candidate whose reconstruction the reference ignores is
# the model's own and is unlearnt; one it follows is a shortcut and is left alone. A candidate must still
# stand out: at least this many robust standard deviations below the median mask.
CANDIDATE_INDEX = 1.0


# An all-to-one backdoor has one target, so beside a strong flag a much weaker one is likelier the data's shortcut
# to its class than a second backdoor (with nine clean classes, about one ten-class scan in five flags one near index
# 2 by chance). Unlearning a spread-out shortcut is adversarial training against a universal perturbation of the
# model and cost the second VGG-16-BN's fresh seed-1 cell 7.02 points (a flag at 2.47 beside its backdoor's 15.83,
# its densest window keeping 10% of its proxy ASR). So a co-flag - a flagged class whose anomaly index is under
# this share of the strongest flag's and whose reconstruction is spread out (local share under LOCAL_SHARE) - is
# unlearnt only where that is cheap (selection/gentler.py CANDIDATE_COST; usecases/default_unlearning.py).
CO_FLAG_SHARE = 1 / 3


def co_flag_classes(anomaly: list[float], flagged: list[int], shares: dict[int, float]) -> list[int]:
    """The co-flags among `flagged` (CO_FLAG_SHARE): under a third of the strongest flag's anomaly index, and spread
    out (`shares`: class -> the share of its reconstruction's effect its densest window keeps; a class not measured
    is not called one). Empty with fewer than two flags."""
    if len(flagged) < 2:
        return []
    strongest = max(anomaly[c] for c in flagged)
    return [c for c in flagged if anomaly[c] < CO_FLAG_SHARE * strongest and shares.get(c, 1.0) < LOCAL_SHARE]


@dataclass
class ReferenceCheck:
    """The flagged classes' reconstructed triggers applied to a clean reference model."""

    checkpoint: str
    rates: dict[int, Rate]  # class -> share of the reference's other-class images sent there
    accuracy: float  # the reference's accuracy on the images the rates were measured on
    input_accuracy: float  # the input model's on the same images
    threshold: float = NATURAL_RATE
    floor: float = 0.0  # the accuracy it needs whatever the input model's (TRIED_FLOOR for a tried reference)

    @property
    def usable(self) -> bool:
        return self.accuracy >= self.input_accuracy - REFERENCE_MARGIN and self.accuracy >= self.floor

    @property
    def natural(self) -> list[int]:
        if not self.usable:
            return []
        return [c for c, rate in self.rates.items() if rate.value >= self.threshold]

    @property
    def planted(self) -> dict[int, Rate]:
        """Classes whose reconstruction the (usable) reference ignores: the model's own, planted triggers."""
        if not self.usable:
            return {}
        return {c: rate for c, rate in self.rates.items() if rate.value < self.threshold}

    def shortcuts(self, flagged: list[int]) -> dict[int, Rate]:
        """The flagged classes this (usable) reference follows too, with its rate: shortcuts of the data."""
        return {c: self.rates[c] for c in self.natural if c in flagged}

    def unusable_reason(self) -> str:
        if self.accuracy < self.floor:
            return (
                f"the clean reference {self.checkpoint}, tried because these images are not its built-in dataset, "
                f"gets {self.accuracy:.1%} of their labels right (at least {self.floor:.0%} needed; the model gets "
                f"{self.input_accuracy:.1%}): not a model of their task, so it was not used"
            )
        return (
            f"the clean reference {self.checkpoint} gets {self.accuracy:.1%} of these images right against the "
            f"model's {self.input_accuracy:.1%} (more than {REFERENCE_MARGIN:.0%} below): too weak a model of the "
            "task to tell shortcuts of the data from planted triggers, so it was not used"
        )

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "threshold": self.threshold,
            "accuracy": round(self.accuracy, 4),
            "input_accuracy": round(self.input_accuracy, 4),
            "margin": REFERENCE_MARGIN,
            "floor": self.floor,
            "usable": self.usable,
            "rates": {str(c): rate.to_dict() for c, rate in self.rates.items()},
            "natural": self.natural,
        }


@dataclass
class ScanEvidence:
    """The scan behind a scan-guided purify, the triggers it chose and what they showed before and after."""

    result: ScanResult
    params: InversionParams
    chosen: list[ClassTrigger]
    choice: str  # why these classes were unlearnt
    proxy_images: str  # which images the proxy ASR was measured on
    proxy_before: dict[int, Rate] = field(default_factory=dict)
    proxy_after: dict[int, Rate] = field(default_factory=dict)
    # the reconstruction cut to its densest window, on the input model (local_rates): is it a local trigger?
    proxy_local: dict[int, Rate] = field(default_factory=dict)
    rescan: dict[int, dict] = field(default_factory=dict)  # flagged class -> the purified model's inversion
    reference: ReferenceCheck | None = None  # --clean-reference: which flagged classes are natural shortcuts
    clean_reference: CleanReference | None = None  # the loaded reference (not reported): tests the re-scan too
    # co-flags tried without (usecases/default_unlearning.py): the record, and the classes left out of the output
    co_flag_trial: dict | None = None
    left: list[int] = field(default_factory=list)

    def local_triggers(self) -> list[ClassTrigger]:
        """The chosen reconstructions the locality test calls local: their densest window keeps at least
        LOCAL_SHARE of their proxy ASR on the input model (what the unlearning's window search needs)."""
        return [
            t
            for t in self.chosen
            if t.target in self.proxy_local
            and t.target in self.proxy_before
            and local_share(self.proxy_local[t.target], self.proxy_before[t.target]) >= LOCAL_SHARE
        ]

    @property
    def flagged(self) -> list[int]:
        return list(self.result.flagged)

    @property
    def natural(self) -> dict[int, Rate]:
        """Flagged classes the clean reference follows too: shortcuts of the data, left alone."""
        return self.reference.shortcuts(self.flagged) if self.reference is not None else {}

    @property
    def suspected(self) -> list[int]:
        """The flagged classes taken for planted triggers (all of them without a clean reference), less the
        co-flags left out of the unlearning because unlearning them was not cheap (`left`)."""
        return [c for c in self.flagged if c not in self.natural and c not in self.left]

    def co_flags(self) -> list[int]:
        """The chosen classes that are co-flags (CO_FLAG_SHARE): flagged, spread out, and far weaker than the
        strongest flag chosen. Empty with fewer than two flags chosen."""
        flagged = [t.target for t in self.chosen if t.target in self.result.flagged]
        shares = {
            c: local_share(self.proxy_local[c], self.proxy_before[c])
            for c in flagged
            if c in self.proxy_local and c in self.proxy_before
        }
        return co_flag_classes(self.result.anomaly, flagged, shares)

    def to_dict(self) -> dict:
        return {
            "method": "neural-cleanse",
            "params": self.params.to_dict(),
            "rule": self.result.rule,
            "classes": [
                {
                    **t.to_dict(),
                    "anomaly_index": round(a, 3),
                    "searched": "full" if self.result.searched_in_full(t.target) else "screen",
                }
                for t, a in zip(self.result.triggers, self.result.anomaly)
            ],
            "screen": screen_summary(self.result),
            "cached": self.result.cached,
            "flagged": self.flagged,
            "unlearnt": [t.target for t in self.chosen],
            "choice": self.choice,
            "proxy_images": self.proxy_images,
            "proxy_asr": {
                str(c): {
                    "before": self.proxy_before[c].to_dict(),
                    "after": self.proxy_after[c].to_dict() if c in self.proxy_after else None,
                    **(
                        {
                            "local": self.proxy_local[c].to_dict(),
                            "local_share": round(local_share(self.proxy_local[c], self.proxy_before[c]), 4),
                        }
                        if c in self.proxy_local
                        else {}
                    ),
                }
                for c in self.proxy_before
            },
            "rescan": {str(c): v for c, v in self.rescan.items()},
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "co_flags": self.co_flag_trial,
            "left": list(self.left),
        }


def screen_summary(result: ScanResult) -> dict | None:
    """Which classes the pre-screen sent to the full search (None when every class was searched in full)."""
    if not result.screened:
        return None
    return {"candidates": list(result.candidates), "reference": list(result.reference)}


def run_scan(
    model: torch.nn.Module,
    images: ImageSet,
    num_classes: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    adapter: LossAdapter,
    params: InversionParams,
    seed: int,
    reporter: Reporter,
    precision: str = "fp32",
    cache: ScanCache | None = None,
) -> ScanResult:
    """Invert a trigger per class on `images` (on the model's device) with a progress bar; `precision` is
    the search's forward arithmetic (the tuning plan's: the search is an optimisation like tuning). With a
    `cache`, a scan of the same model, images and settings is read back instead (scanning/cache.py)."""

    def on_class(trigger: ClassTrigger) -> None:
        reporter.epoch(
            f"class {trigger.target}: mask L1 {trigger.l1:.1f}, success {trigger.success:.0%}"
            + ("" if trigger.reached else " (success target not reached)")
        )

    def search() -> ScanResult:
        total = params.planned_steps(num_classes)
        reporter.start_steps("trigger inversion", total)
        try:
            with attach_loss(model, adapter) as loss_fn:
                return scan_model(
                    model,
                    images.x,
                    images.y,
                    num_classes,
                    mean,
                    std,
                    loss_fn,
                    params,
                    seed,
                    on_class=on_class,
                    on_step=step_callback(reporter, "scan", total),
                    precision=precision,
                )
        finally:
            reporter.finish_steps()

    if cache is None:
        return search()
    key = scan_key(model, images, num_classes, mean, std, adapter, params, seed, precision)
    found = cache.get(key, images.image_shape)
    if found is not None:
        model.eval()  # as the search leaves it: what runs next sees the model in the same mode either way
        reporter.info(
            f"the scan was read from the scan cache ({cache.root}, entry {key.digest[:12]}): this model was "
            "scanned on the same images with the same settings, software and processor before"
        )
        for trigger in found.triggers:
            if found.searched_in_full(trigger.target):
                on_class(trigger)
        return found
    result = search()
    if not cache.put(key, result):
        reporter.info("the scan was not kept in the scan cache (too large to keep, or the folder is not writable)")
    return result


def smallest_mask_words(result: ScanResult, target: int) -> str:
    """The unflagged smallest mask in words, as the choice of what to unlearn states it."""
    return f"class {target} has the smallest mask (anomaly index {result.anomaly[target]:.2f} <= {result.threshold:g})"


def choose_triggers(result: ScanResult, precaution: bool = False) -> tuple[list[ClassTrigger], str]:
    """Every flagged class. With none flagged, nothing - or, with `precaution`, the class of the most
    anomalous (smallest) mask anyway.

    Why nothing by default: on a clean model, unlearning a spurious reconstruction (a universal adversarial
    patch of the class) is adversarial training against it, and cost the clean ResNet-20 3.08 points of
    C-Acc on the full test set, where unlearning a real backdoor's reconstruction cost the patch-trigger
    ResNet-20 0.64 (docs/purification.md). A trigger below the flagging threshold can still be the
    backdoor's (measured on a blend-trigger ResNet-32: anomaly index 1.34, its class the true target, and
    unlearning it removed the backdoor): `--precaution` is for a user who accepts that cost."""
    if result.flagged:
        chosen = [result.triggers[c] for c in result.flagged]
        return chosen, f"flagged by the scan: class {', '.join(str(c) for c in result.flagged)}"
    top = max((c for c in range(len(result.triggers)) if result.searched_in_full(c)), key=lambda c: result.anomaly[c])
    smallest = smallest_mask_words(result, top)
    if precaution:
        return [result.triggers[top]], f"no class flagged; {smallest} and was unlearnt as a precaution (--precaution)"
    return [], (
        f"no class flagged, so nothing was unlearnt and the model is left unchanged; {smallest} "
        "(--precaution unlearns it anyway, at a cost of about 3 points on a clean CIFAR-10 ResNet-20)"
    )


def candidate_below_threshold(result: ScanResult) -> ClassTrigger | None:
    """With no class flagged, the class of the smallest fully searched mask, if it stands out at least
    CANDIDATE_INDEX (else None): what a clean reference may vouch for (vouch_for_candidate)."""
    if result.flagged:
        return None
    top = max((c for c in range(len(result.triggers)) if result.searched_in_full(c)), key=lambda c: result.anomaly[c])
    return result.triggers[top] if result.anomaly[top] >= CANDIDATE_INDEX else None


def vouch_for_candidate(
    candidate: ClassTrigger, result: ScanResult, check: ReferenceCheck
) -> tuple[list[ClassTrigger], str]:
    """The sub-threshold candidate to unlearn when the (usable) clean reference ignores its reconstruction, and
    the choice in words either way."""
    c = candidate.target
    smallest = f"no class flagged; {smallest_mask_words(result, c)}"
    if not check.usable:
        return [], f"{smallest}, and {check.unusable_reason()}; nothing was unlearnt"
    rate = check.rates[c]
    if c in check.planted:
        return [candidate], (
            f"{smallest}, and the clean reference {check.checkpoint} sends only {rate.value:.1%} of its other-class "
            f"images there with its reconstruction (below {check.threshold:.0%}): taken for this model's own trigger "
            "and unlearnt (a candidate below the threshold: the verdict cannot say verified on it)"
        )
    return [], (
        f"{smallest}, and the clean reference {check.checkpoint} follows its reconstruction too ({rate.value:.1%}): "
        "a shortcut of the data, so nothing was unlearnt"
    )


def proxy_asr(
    model: torch.nn.Module,
    images: ImageSet,
    trigger: ClassTrigger,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 256,
) -> Rate:
    """Share of `images` not of the trigger's class that the reconstructed trigger sends to it (fp32)."""
    others = images.x[images.y != trigger.target]
    device = others.device
    mask = trigger.mask.to(device)[None, None]
    pattern = trigger.pattern.to(device).permute(2, 0, 1)[None]
    was_training = model.training
    model.eval()
    try:
        hits = count_hits(model, others, trigger.target, mask, pattern, mean, std, batch_size, channels_last=True)
    finally:
        model.train(was_training)
    return Rate(hits, int(others.shape[0]))


def proxy_rates(model, images: ImageSet, triggers: list[ClassTrigger], mean, std) -> dict[int, Rate]:
    return {t.target: proxy_asr(model, images, t, mean, std) for t in triggers}


def window_side(height: int, width: int) -> int:
    """The side of the locality test's window: the image's shorter side // LOCAL_WINDOW_FRACTION."""
    return max(1, min(height, width) // LOCAL_WINDOW_FRACTION)


def densest_window(mask: torch.Tensor, side: int) -> tuple[int, int]:
    """(top, left) of the side x side window holding the most mass of an (H, W) mask; ties: the first in row
    order."""
    sums = torch.nn.functional.avg_pool2d(mask.float()[None, None], side, stride=1)[0, 0]  # mean mass of each
    top, left = divmod(int(sums.flatten().argmax()), sums.shape[1])
    return top, left


def localize(trigger: ClassTrigger) -> ClassTrigger:
    """The reconstruction cut to its densest square window of side min(H, W) // LOCAL_WINDOW_FRACTION (the
    window holding the most mask mass; ties: the first in row order); the pattern is kept as it is."""
    mask = trigger.mask.float()
    side = window_side(*mask.shape)
    top, left = densest_window(mask, side)
    core = torch.zeros_like(mask)
    core[top : top + side, left : left + side] = mask[top : top + side, left : left + side]
    return ClassTrigger(
        trigger.target, core, trigger.pattern, float(core.sum()), trigger.success, trigger.reached, trigger.steps
    )


def local_rates(model, images: ImageSet, triggers: list[ClassTrigger], mean, std) -> dict[int, Rate]:
    """Each reconstruction's proxy ASR when cut to its densest window (localize): how local the trigger is."""
    return {t.target: proxy_asr(model, images, localize(t), mean, std) for t in triggers}


def local_share(local: Rate, whole: Rate) -> float:
    """The share of the whole reconstruction's proxy ASR its densest window keeps (1.0 when both are 0)."""
    return 1.0 if whole.value == 0 else local.value / whole.value


@dataclass(frozen=True)
class CleanReference:
    """A loaded --clean-reference: its path, model (on the run's device, eval mode) and normalisation."""

    path: str
    model: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    floor: float = 0.0  # the accuracy its check needs whatever the input model's (TRIED_FLOOR: tried, not named)


def check_reference(
    reference: CleanReference,
    images: ImageSet,
    triggers: list[ClassTrigger],
    model: torch.nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> ReferenceCheck:
    """Each trigger's rate on the clean reference over `images`, and both models' accuracy on them (whether
    the reference is competent enough to be evidence)."""
    return ReferenceCheck(
        reference.path,
        proxy_rates(reference.model, images, triggers, reference.mean, reference.std),
        accuracy=top1_accuracy(reference.model, images, reference.mean, reference.std),
        input_accuracy=top1_accuracy(model, images, mean, std),
        floor=reference.floor,
    )


def set_aside_natural(chosen: list[ClassTrigger], choice: str, check: ReferenceCheck) -> tuple[list[ClassTrigger], str]:
    """The chosen triggers without those the clean reference follows too, and the choice in words."""
    if not check.usable:
        return chosen, choice + "; " + check.unusable_reason()
    natural = set(check.natural)
    if not natural & {t.target for t in chosen}:
        return chosen, choice + f"; the clean reference follows none of them (all below {check.threshold:.0%})"
    kept = [t for t in chosen if t.target not in natural]
    parts = ", ".join(f"class {c} ({check.rates[c].value:.1%})" for c in sorted(natural))
    note = (
        f"; the clean reference {check.checkpoint} follows {parts} too (at least {check.threshold:.0%} of its "
        "other-class images sent there): shortcuts of the data, not planted triggers, so not unlearnt"
    )
    return kept, choice + note


def rescan(
    model: torch.nn.Module,
    images: ImageSet,
    classes: list[int],
    result: ScanResult,
    mean: torch.Tensor,
    std: torch.Tensor,
    adapter: LossAdapter,
    params: InversionParams,
    seed: int,
    precision: str = "fp32",
    reference: CleanReference | None = None,
    reference_images: ImageSet | None = None,
) -> dict[int, dict]:
    """Invert each class again on `model`; its anomaly index against the input scan's log-L1 median and MAD.

    A class still flagged may have found the data's own shortcut to it rather than the backdoor (measured: a
    patch-trigger ResNet-56 planted from a clean ResNet-56 whose airplane class is flagged by every scan; after
    unlearning, true ASR 2.1%, the re-scan of class 0 found a 36-pixel mask, anomaly index 2.20). With a
    clean `reference`, its re-scanned trigger is applied to the reference on `reference_images`:
    `reference_rate`, and `shortcut` when the reference follows it too (NATURAL_RATE)."""
    generator = torch.Generator().manual_seed(seed + 7919)  # not the first scan's draws
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    log_median = math.log(max(result.median_l1, MIN_L1))
    found: dict[int, dict] = {}
    try:
        with attach_loss(model, adapter) as loss_fn:
            for trigger in invert_classes(
                model, images.x, images.y, list(classes), mean, std, loss_fn, params, generator, precision=precision
            ):
                target = trigger.target
                if result.mad > 1e-12:
                    index = (log_median - math.log(max(trigger.l1, MIN_L1))) / (MAD_CONSISTENCY * result.mad)
                else:
                    index = 0.0
                found[target] = {
                    "mask_l1": round(trigger.l1, 3),
                    "input_mask_l1": round(result.triggers[target].l1, 3),
                    "success": round(trigger.success, 4),
                    "reached_success": trigger.reached,
                    "anomaly_index": round(index, 3),
                    "flagged": bool(trigger.reached and index > result.threshold),
                }
                if found[target]["flagged"] and reference is not None and reference_images is not None:
                    rate = proxy_asr(reference.model, reference_images, trigger, reference.mean, reference.std)
                    found[target]["reference_rate"] = rate.to_dict()
                    found[target]["shortcut"] = rate.value >= NATURAL_RATE
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return found
