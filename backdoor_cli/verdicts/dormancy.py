"""The trigger-free dormancy check: does the scan's reconstruction, made opaque, come back when the output is retuned?

Holding the early layers while unlearning a patch costs the clean images less, but it can leave the backdoor
dormant: on a VGG-16-BN planted as issue 21 asks, the held-layer output's true-trigger ASR was 1-2%, and retuning
with 5 poisoned images (verdicts/retune.py) brought it to 28% (its clean parent: 1%); with every layer trained,
2% (docs/purification.md, fourteenth session). The user's trigger is not needed to see it: the scan's
reconstruction, used as the retuning trigger, came back the same way (33% on that output, 1.6% with every layer
trained, 1.5-6.0% on four ResNet outputs where the true trigger did not come back either).

So the check is the retuning attack with the reconstruction in the trigger's place: a *copy* of the output is
tuned on the tuning images with `poisoned` of them stamped and labelled the reconstruction's class (the authors'
protocol, retune.PROTOCOL), and the stamp's proxy ASR is measured on the held-out images before and after. With
no clean model to compare with, the output's own proxy ASR before retuning stands for the reference: dormant when
retuning raises it by more than retune.DORMANT_MARGIN (the issue's 10 points) with non-overlapping 95% intervals.
That reference is lower than a clean model's after retuning (which learns a little from five images), so the rule
errs toward calling a removal dormant: its price is a rerun's cost in accuracy and time
(usecases/default_unlearning.py unlearns again with fewer layers held), never a dormant backdoor called removed.

The stamp is the reconstruction made opaque (`make_opaque`): its round(L1) heaviest pixels replaced by its
pattern, the rest of the image left as it is. The soft reconstruction itself is what the unlearning stamped for
ten epochs, so the output is drilled against exactly it, and it missed: on a second VGG-16-BN it rose 2.8 and 10.0
points while the true trigger came back to 22.0% and 18.9% after retuning (its clean parent: 7.1%). A patch
trigger is opaque, and so is this copy of the reconstruction's mass: on the same two outputs it rose 11.1 and 31.6
points, on the first VGG-16-BN's dormant output 34.4 (the soft one: 17.8). Of seven outputs whose true trigger did
not come back it fired on two (the soft one on one of them), both VGG-16-BN outputs holding a third of the layers:
those cost a rerun with every layer, the check's price (docs/purification.md, eighteenth session).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..data.datasets import ImageSet
from ..evaluation.metrics import Rate
from ..models.output_kind import LOGITS, LossAdapter
from ..scanning.guided import proxy_asr
from ..scanning.inversion import ClassTrigger
from .retune import DORMANT_MARGIN, PROTOCOL, RetuneSettings, is_dormant, poisoned_tuning_set, retuned_copy


def make_opaque(trigger: ClassTrigger) -> ClassTrigger:
    """The reconstruction as a patch: a mask of 1 on its round(L1) heaviest pixels (at least one; ties broken by
    position, so every run picks the same) and 0 elsewhere, its pattern kept. The mask's L1 is unchanged up to
    rounding: the copy carries the same mass, all of it opaque."""
    flat = trigger.mask.flatten().to(torch.float32)
    count = min(flat.numel(), max(1, round(trigger.l1)))
    heaviest = torch.sort(flat, descending=True, stable=True).indices[:count]
    mask = torch.zeros_like(flat)
    mask[heaviest] = 1.0
    return dataclasses.replace(trigger, mask=mask.view(trigger.mask.shape), l1=float(count))


def opaque_pixels(stamp: ClassTrigger) -> int:
    """How many of a stamp's pixels are fully opaque (mask 1): all of an opaque copy's, few of a soft one's."""
    return int((stamp.mask >= 1).sum())


class ReconstructionStamp:
    """A scan reconstruction as the retuning check's trigger: `apply` stamps uint8 (N, H, W, C) batches,
    x' = round((1 - m) x + m * 255 p), as the built blend-like triggers round (triggers/apply.py)."""

    def __init__(self, trigger: ClassTrigger):
        self.target = trigger.target
        self._mask = trigger.mask.to(torch.float32)[None, :, :, None]
        self._pattern = trigger.pattern.to(torch.float32)[None] * 255.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mask, pattern = self._mask.to(x.device), self._pattern.to(x.device)
        y = x.to(torch.float32) * (1 - mask) + mask * pattern
        return y.round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class DormancyCheck:
    """One reconstruction's retuning on one output: its proxy ASR before and after, and whether that is dormant."""

    target: int
    proxy: Rate  # the opaque stamp's, on the output before retuning (the stand-in reference: module docstring)
    proxy_retuned: Rate
    settings: RetuneSettings
    seconds: float
    pixels: int = 0  # how many of the reconstruction's pixels the opaque stamp covers (make_opaque)

    @property
    def dormant(self) -> bool:
        return is_dormant(self.proxy_retuned, self.proxy)

    def describe(self) -> str:
        state = "dormant: it comes back" if self.dormant else "not revived"
        return (
            f"class {self.target}: retuning a copy with {self.settings.poisoned} images stamped with the "
            f"reconstruction's {self.pixels} heaviest pixels, opaque, takes that stamp's proxy ASR from "
            f"{self.proxy.value:.1%} to {self.proxy_retuned.value:.1%} "
            f"({state}; dormant means more than {DORMANT_MARGIN:.0%} up, intervals apart)"
        )

    def to_dict(self) -> dict:
        return {
            "class": self.target,
            "proxy_asr": self.proxy.to_dict(),
            "proxy_asr_after_retuning": self.proxy_retuned.to_dict(),
            "dormant": self.dormant,
            "margin": DORMANT_MARGIN,
            "stamp": {"opaque_pixels": self.pixels},
            "settings": self.settings.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def dormancy_settings(seed: int, augment: bool) -> RetuneSettings:
    """The authors' protocol (5 poisoned images, 5 epochs, lr 0.01), seeded by the run, augmenting the clean
    images only where the run's own tuning does (digits are never flipped: `flip` is the caller's)."""
    return RetuneSettings(sgd=dataclasses.replace(PROTOCOL, seed=seed, augment=augment))


def check_dormancy(
    model: torch.nn.Module,
    tuning: ImageSet,
    proxy_images: ImageSet,
    triggers: Sequence[ClassTrigger],
    mean: torch.Tensor,
    std: torch.Tensor,
    settings: RetuneSettings,
    device,
    flip: bool = True,
    loss_adapter: LossAdapter = LOGITS,
    precision: str | None = None,
    make_stamp: Callable[[ClassTrigger], ClassTrigger] = make_opaque,
) -> list[DormancyCheck]:
    """Each reconstruction's retuning on a copy of `model` (`model` is untouched): tuned on `tuning` with
    `settings.poisoned` images stamped with its opaque copy (make_opaque) and relabelled, that stamp measured on
    `proxy_images` (the held-out images) before and after. `make_stamp` is for measuring other stamps
    (experiments/dormancy_probe.py); purify keeps the opaque copy."""
    checks = []
    for reconstruction in triggers:
        start = time.perf_counter()
        stamp = make_stamp(reconstruction)
        before = proxy_asr(model, proxy_images, stamp, mean, std)
        poisoned, mask = poisoned_tuning_set(tuning, ReconstructionStamp(stamp), settings)
        attacked = retuned_copy(model, poisoned, mask, mean, std, settings, device, flip, loss_adapter, precision)
        after = proxy_asr(attacked, proxy_images, stamp, mean, std)
        del attacked
        elapsed = time.perf_counter() - start
        checks.append(DormancyCheck(stamp.target, before, after, settings, elapsed, pixels=opaque_pixels(stamp)))
    return checks


RERUN_KEPT = ("rerun", "every_layer")  # DormancyRecord.kept when a rerun is the output


@dataclass(frozen=True)
class DormancyRerun:
    """An unlearning run again from the input after a dormant output: the share of weight layers it was asked to
    hold, how many it held (0: every layer trained), the check on its output, the rate its kept weights were tuned
    at and the weight of the input's clean outputs it distilled (0: none)."""

    frozen_depth: float
    held_layers: int
    checks: list[DormancyCheck]
    lr: float
    distill: float = 0.0

    @property
    def dormant(self) -> bool:
        return any(c.dormant for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "frozen_depth": round(self.frozen_depth, 4),
            "held_layers": self.held_layers,
            "distill": self.distill,
            "lr": self.lr,
            "checks": [c.to_dict() for c in self.checks],
            "dormant": sorted(c.target for c in self.checks if c.dormant),
        }

    @property
    def kept_as(self) -> str:
        """What DormancyRecord.kept says when this rerun is the output."""
        return "every_layer" if self.held_layers == 0 else "rerun"


@dataclass
class DormancyRecord:
    """The check on the held-layer output, and, when it was dormant, on each run again from the input with fewer
    layers held (`reruns`, in order). `kept`: which output the run wrote ('held'; the last rerun: 'every_layer' when
    it held none, 'rerun' when it held some; or 'input' when the unlearning of a candidate was undone afterwards,
    so no checked output was written); `note`: why, in words."""

    held_layers: int
    held: list[DormancyCheck]
    reruns: list[DormancyRerun] = field(default_factory=list)
    kept: str = "held"
    note: str = ""

    @property
    def poisoned(self) -> int:
        """How many stamped images the retuning used (the protocol's, the same for every check)."""
        return self.held[0].settings.poisoned if self.held else RetuneSettings().poisoned

    @property
    def kept_checks(self) -> list[DormancyCheck]:
        if self.kept == "input":
            return []
        return self.reruns[-1].checks if self.kept in RERUN_KEPT and self.reruns else self.held

    @property
    def dormant(self) -> dict[int, Rate]:
        """The classes whose reconstruction (made opaque) comes back on the kept output, with the rate it comes back to."""
        return {c.target: c.proxy_retuned for c in self.kept_checks if c.dormant}

    def to_dict(self) -> dict:
        return {
            "held_layers": self.held_layers,
            "held": [c.to_dict() for c in self.held],
            "reruns": [r.to_dict() for r in self.reruns],
            # report schema 1 had only the every-layer rerun: kept for its readers (fields are only added within it)
            "every_layer": next(([c.to_dict() for c in r.checks] for r in self.reruns if r.held_layers == 0), None),
            "kept": self.kept,
            "dormant": sorted(self.dormant),
            "note": self.note,
        }
