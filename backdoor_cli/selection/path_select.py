"""Trigger-free control of the accuracy cost: a point on the straight line back to the input model.

A tuning defense moves the weights from the input θ₀ to θ₁. On the line θ(t) = (1 − t)·θ₀ + t·θ₁,
clean accuracy rises toward t = 0 and the backdoor comes back toward t = 0; measured on strong
CIFAR-10 subjects (docs/purification.md), the backdoor returns late, so a point short of θ₁ can
keep most of the removal at a fraction of the cost. Which point is decided by held-out clean images
only — never the test set, never the trigger: the largest t (the point nearest the purified model)
whose held-out accuracy is within the budget of the input model's. t never goes below FLOOR: the
held-out images cannot see the backdoor, and on the lines measured it came back below t = 0.5
(Blended) and below t = 0.75 (SIG), so the default floor is 0.8. When no point reaches the budget,
the floor itself (the most accurate point allowed) is kept and the reason says the budget was not met.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.datasets import ImageSet
from ..evaluation.measure import top1_accuracy
from .linear_path import interpolate_states

FLOOR = 0.8  # the smallest t chosen by default (see the module docstring and docs/purification.md)
STEP = 0.05  # the grid from 1 down to FLOOR: 11 evaluations of the held-out images
DEFAULT_BUDGET = 0.03  # held-out accuracy the selection may give up when --max-acc-drop is not given
MEMORISED = 0.99  # input accuracy on held-out images at or above which they were probably trained on
TOLERANCE = 1e-9  # accuracies are ratios of counts: 0.92 - 0.89 must count as 3 points, not 3.0000000000000027


@dataclass
class PathSelection:
    """The held-out accuracy along the line, the chosen t, and why."""

    budget: float
    base_acc: float
    floor: float = FLOOR
    curve: list[dict] = field(default_factory=list)  # {t, holdout_acc, within_budget}, from t = 1 down
    chosen_t: float = 1.0
    reason: str = ""
    warning: str | None = None

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "input_acc": round(self.base_acc, 6),
            "floor": self.floor,
            "chosen_t": self.chosen_t,
            "reason": self.reason,
            "warning": self.warning,
            "curve": self.curve,
        }


def grid(floor: float = FLOOR, step: float = STEP) -> list[float]:
    """t = 1, 1 - step, ..., floor (rounded, so the report shows 0.85 rather than 0.8500000001)."""
    points, i = [], 0
    while 1 - i * step > floor + 1e-9:
        points.append(round(1 - i * step, 6))
        i += 1
    return points + [round(floor, 6)]


def memorised_warning(base_acc: float) -> str | None:
    if base_acc < MEMORISED:
        return None
    return (
        f"the input model scores {base_acc:.1%} on the held-out images: they were probably part of its "
        "training data, so the held-out cost is overstated and the selection stays nearer the input than "
        "it needs to; pass clean images the model never saw (--clean-data)"
    )


@torch.no_grad()
def select_on_path(
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    held: ImageSet,
    base_acc: float,
    budget: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    floor: float = FLOOR,
    step: float = STEP,
) -> PathSelection:
    """Score the held-out images at each t of the grid (the model's current weights are t = 1), load
    the chosen point into `model`, and say what was chosen and why. `start` is the input's state dict."""
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    choice = PathSelection(budget=budget, base_acc=base_acc, floor=floor, warning=memorised_warning(base_acc))
    for t in grid(floor, step):
        model.load_state_dict(interpolate_states(start, end, t) if t < 1 else end)
        acc = top1_accuracy(model, held, mean, std)
        within = base_acc - acc <= budget + TOLERANCE
        choice.curve.append({"t": t, "holdout_acc": round(acc, 6), "within_budget": within})
    picked = next((row for row in choice.curve if row["within_budget"]), None)
    if picked is None:  # the budget cannot be met: go as far back as the floor allows, and say so
        choice.chosen_t = choice.curve[-1]["t"]
        choice.reason = (
            f"no point with t >= {floor} stayed within {budget:.1%} of the input's held-out accuracy "
            f"({base_acc:.1%}); t = {choice.chosen_t:.2f}, the nearest the selection goes to the input, "
            f"is kept at {choice.curve[-1]['holdout_acc']:.1%}: the budget is not met"
        )
    else:
        choice.chosen_t = picked["t"]
        if picked["t"] == 1.0:
            choice.reason = (
                f"the purified model (t = 1) is within {budget:.1%} of the input's held-out accuracy "
                f"({picked['holdout_acc']:.1%} vs {base_acc:.1%}); kept as tuned"
            )
        else:
            choice.reason = (
                f"t = {picked['t']:.2f}: the point nearest the purified model whose held-out accuracy "
                f"({picked['holdout_acc']:.1%}) is within {budget:.1%} of the input's ({base_acc:.1%})"
            )
    model.load_state_dict(interpolate_states(start, end, choice.chosen_t) if choice.chosen_t < 1 else end)
    return choice
