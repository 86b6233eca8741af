"""The retuning check: is a low ASR a removed backdoor, or a dormant one?

Min et al. (NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense") show that fine-tuning a purified model on clean data with only a handful of poisoned images
brings the backdoor back for most defences, while a model that never had it stays clean under the
same treatment. This module runs that check on a *copy* of a model (the copy is never written):
the clean tuning images with `poisoned` of them replaced by their triggered versions labelled with
the target (those are never augmented), SGD at a constant learning rate, then the ASR on the same
triggered test images every other figure of the run uses.

The default protocol is the authors' code: 5 poisoned images, SGD lr 0.01, momentum 0.9, no schedule,
batch 128, 5 epochs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..config import check_fields
from ..data.datasets import ImageSet
from ..errors import ConfigError
from ..evaluation.measure import EvalSets, evaluate_model
from ..evaluation.metrics import Rate
from ..models.output_kind import LOGITS, LossAdapter
from ..reports.report import pct
from ..tuning.loop import TuneSettings, tune
from ..tuning.sgd import SgdSettings

# Without a clean reference, a retuned ASR at or above this reads as a dormant backdoor. In the paper a
# model trained without the backdoor stays at a few percent under the same 5-image treatment.
DORMANT_WITHOUT_REFERENCE = 0.20
# With a reference, the check calls a backdoor dormant when its retuned ASR exceeds the reference's by
# more than this and their 95% intervals do not overlap.
DORMANT_MARGIN = 0.10
# Above this ASR before retuning, the backdoor is plainly active; the check adds nothing to that.
ACTIVE_ASR = 0.50
# The authors' protocol (module docstring); `augment` applies to the clean images only, the poisoned
# ones never are.
PROTOCOL = SgdSettings(epochs=5, lr=0.01, batch_size=128, momentum=0.9, augment=True, schedule="constant")


@dataclass(frozen=True)
class RetuneSettings:
    poisoned: int = 5
    sgd: SgdSettings = PROTOCOL  # its seed also chooses the poisoned images

    def validate(self) -> RetuneSettings:
        check_fields(
            {"poisoned": self.poisoned, "epochs": self.sgd.epochs, "lr": self.sgd.lr},
            {"poisoned": "retune_poisoned", "epochs": "retune_epochs", "lr": "retune_lr"},
        )
        return self

    def to_dict(self) -> dict:
        sgd = self.sgd
        return {
            "poisoned": self.poisoned,
            "epochs": sgd.epochs,
            "lr": sgd.lr,
            "momentum": sgd.momentum,
            "batch_size": sgd.batch_size,
            "augment": sgd.augment,
            "seed": sgd.seed,
            "schedule": sgd.schedule,
            "poisoned_augmented": False,
        }


@dataclass
class RetuneResult:
    """ASR (and C-Acc) of the retuned copy, beside the model's own ASR."""

    asr_before: Rate
    asr_after: Rate
    clean_acc_after: Rate
    settings: RetuneSettings
    seconds: float
    reference_asr_after: Rate | None = None
    reference_asr: Rate | None = None  # the clean reference's ASR before its retuning
    verdict: str = ""
    status: str = ""  # 'dormant' | 'not-revived' | 'active'

    def to_dict(self) -> dict:
        return {
            "asr": self.asr_before.to_dict(),
            "asr_after_retuning": self.asr_after.to_dict(),
            "clean_acc_after_retuning": self.clean_acc_after.to_dict(),
            "reference_asr_after_retuning": self.reference_asr_after.to_dict() if self.reference_asr_after else None,
            "reference_asr": self.reference_asr.to_dict() if self.reference_asr else None,
            "status": self.status,
            "verdict": self.verdict,
            "settings": self.settings.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def poisoned_tuning_set(clean: ImageSet, trigger, settings: RetuneSettings) -> tuple[ImageSet, torch.Tensor]:
    """The clean set with `poisoned` non-target images replaced by triggered copies labelled the target,
    and the mask of those images (seeded choice, so the reference model gets the same images)."""
    candidates = torch.nonzero(clean.y.cpu() != trigger.target).flatten()
    if len(candidates) < settings.poisoned:
        raise ConfigError(
            f"the retuning check needs {settings.poisoned} clean images outside the target class; "
            f"the tuning set has {len(candidates)}"
        )
    generator = torch.Generator().manual_seed(settings.sgd.seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: settings.poisoned]].to(clean.x.device)
    x, y = clean.x.clone(), clean.y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = trigger.target
    mask = torch.zeros(len(y), dtype=torch.bool, device=clean.x.device)
    mask[chosen] = True
    return ImageSet(x, y), mask


def retuned_copy(
    model: torch.nn.Module,
    tuning: ImageSet,
    poisoned_mask: torch.Tensor,
    mean,
    std,
    settings: RetuneSettings,
    device,
    flip: bool = True,
    loss_adapter: LossAdapter = LOGITS,
    precision: str | None = None,
) -> torch.nn.Module:
    """Fine-tune a copy of `model` (all layers) on the poisoned tuning set; `model` is untouched."""
    attacked = copy.deepcopy(model)
    for p in attacked.parameters():
        p.requires_grad_(True)
    tune(
        attacked,
        tuning,
        mean,
        std,
        TuneSettings(settings.sgd, flip=flip),
        device,
        loss_adapter=loss_adapter,
        no_augment=poisoned_mask,
        precision=precision,
    )
    return attacked.eval()


def check_retuning(
    model,
    clean: ImageSet,
    trigger,
    sets: EvalSets,
    mean,
    std,
    settings: RetuneSettings,
    device,
    asr_before: Rate,
    batch_size: int | None = None,
    flip: bool = True,
    loss_adapter: LossAdapter = LOGITS,
    plan=None,
) -> RetuneResult:
    """Retune a copy and measure it on `sets`; the verdict is filled in by `judge`. `plan` (a
    precision.PrecisionPlan) gives the tuning and evaluation precision, as for the run's own figures."""
    if trigger is None or not sets.has_trigger:
        raise ConfigError("the retuning check needs a trigger", hint="pass --trigger (a built-in name or a spec file)")
    start = time.perf_counter()
    tuning, mask = poisoned_tuning_set(clean.to(device), trigger, settings)
    attacked = retuned_copy(
        model, tuning, mask, mean, std, settings, device, flip, loss_adapter, plan.tune if plan is not None else None
    )
    result = evaluate_model(
        attacked, sets, mean, std, device, batch_size, precision=plan.evaluate if plan is not None else None
    )
    del attacked
    return RetuneResult(
        asr_before=asr_before,
        asr_after=result.asr,
        clean_acc_after=result.clean_acc,
        settings=settings,
        seconds=time.perf_counter() - start,
    )


def judge(result: RetuneResult, reference: RetuneResult | None = None) -> RetuneResult:
    """Fill in status and a plain-words verdict (the rule: module constants above)."""
    n = result.settings.poisoned
    after, before = result.asr_after, result.asr_before
    ref = reference.asr_after if reference is not None else None
    result.reference_asr_after = ref
    result.reference_asr = reference.asr_before if reference is not None else None
    ref_text = f" (a clean model: {pct(ref)})" if ref is not None else " (no clean reference given)"
    if before.value >= ACTIVE_ASR:
        result.status = "active"
        result.verdict = (
            f"backdoor active: ASR is {pct(before)} before any retuning; retuning with {n} poisoned "
            f"images gives {pct(after)}{ref_text}"
        )
    elif is_dormant(after, ref):
        result.status = "dormant"
        result.verdict = (
            f"backdoor dormant: retuning with {n} poisoned images brings ASR back from {pct(before)} "
            f"to {pct(after)}{ref_text}"
        )
    else:
        result.status = "not-revived"
        result.verdict = f"not revived: retuning with {n} poisoned images leaves ASR at {pct(after)}{ref_text}"
    return result


def is_dormant(after: Rate, reference: Rate | None) -> bool:
    if reference is None:
        return after.value >= DORMANT_WITHOUT_REFERENCE
    return after.value - reference.value > DORMANT_MARGIN and after.low > reference.high
