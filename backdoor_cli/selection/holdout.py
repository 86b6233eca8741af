"""Held-out clean images: a trigger-free view of what tuning costs, and the epoch it keeps.

Part of the defender's clean data is kept out of tuning (class-balanced, seeded). Its accuracy is
measured on the input model and after every epoch: the curve is the report's estimate of the
accuracy cost, made without the test set and without the trigger. With a budget (`--max-acc-drop`),
the purified model is the *latest* epoch whose held-out accuracy is within the budget of the input
model's: later epochs have shifted the features further, which is what removes a backdoor, so the
latest acceptable one is preferred over the most accurate one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.datasets import ImageSet, select_clean_subset
from ..errors import ConfigError
from ..evaluation.measure import top1_accuracy


@dataclass
class HoldoutMonitor:
    """The held-out images, the input model's accuracy on them, the per-epoch curve, and the pick."""

    images: ImageSet
    base_acc: float
    budget: float | None = None
    curve: list[dict] = field(default_factory=list)
    selected_epoch: int | None = None
    _snapshot: dict | None = None

    def observe(self, model: torch.nn.Module, epoch: int, mean: torch.Tensor, std: torch.Tensor) -> float:
        acc = top1_accuracy(model, self.images, mean, std)
        within = self.budget is not None and self.base_acc - acc <= self.budget + 1e-9  # ratios of counts
        self.curve.append({"epoch": epoch, "holdout_acc": round(acc, 6), "within_budget": within})
        if within:  # only the latest acceptable epoch is kept: one copy of the weights, not one per epoch
            self.selected_epoch = epoch
            self._snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return acc

    def restore(self, model: torch.nn.Module, last_epoch: int) -> str:
        """Load the selected epoch into `model` and say what was chosen and why."""
        if self.budget is None:
            return "no budget: the last epoch is kept"
        if self._snapshot is None:
            return (
                f"no epoch stayed within {self.budget:.1%} of the input's held-out accuracy "
                f"({self.base_acc:.1%}); the last epoch is kept"
            )
        if self.selected_epoch != last_epoch:
            model.load_state_dict(self._snapshot)
        return (
            f"epoch {self.selected_epoch}: the latest whose held-out accuracy stayed within "
            f"{self.budget:.1%} of the input's ({self.base_acc:.1%})"
        )

    def to_dict(self) -> dict:
        return {
            "images": self.images.num_images,
            "input_acc": round(self.base_acc, 6),
            "budget": self.budget,
            "curve": self.curve,
            "selected_epoch": self.selected_epoch,
        }


def split_holdout(clean: ImageSet, fraction: float, seed: int, num_classes: int) -> tuple[ImageSet, ImageSet]:
    """(tuning images, held-out images): a seeded, class-balanced `fraction` of the clean set is held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--holdout-fraction must be in (0, 1), got {fraction}")
    held = select_clean_subset(clean.y.cpu(), fraction, None, seed + 1, num_classes)
    if len(held) == 0 or len(held) >= clean.num_images - 1:
        raise ConfigError(
            f"--holdout-fraction {fraction} of {clean.num_images} clean images leaves nothing to tune or to hold out",
            hint="use more clean images or a fraction like 0.1-0.2",
        )
    keep = torch.ones(clean.num_images, dtype=torch.bool)
    keep[held] = False
    return clean.subset(torch.nonzero(keep).flatten()), clean.subset(held)
