"""The unlearning's search inside a reconstruction's densest window (`WindowSearch`).

The scan's reconstruction of a patch trigger is a soft, partial copy of it: a 4x4 white square came back
as 16 pixels of mask mass, a third to a half opaque, half of it on the square's border and half scattered
(docs/purification.md, tenth session). Unlearning that copy left the true square working on 2.8-5.7% of
images across seeds, where unlearning the true square itself left 2.3-2.8%. So half of the stamped images
get the reconstruction's densest window (the locality test's: a quarter of the image's shorter side) fully
opaque, filled with a pattern that is searched during the run: before each stamp, one signed-gradient step
moves it toward sending images to the target class on the current weights. The labels stay true, so every
step unlearns the strongest pattern the window holds at that moment, not only the one the scan stopped at.

The step runs in eval mode (BatchNorm's running statistics untouched: SAU's lesson, defenses/sau.py), in
fp32, on a fixed share of the batch (no data-dependent shapes, so no device sync), and writes no parameter
gradient. Its images are the batch's first `k`; batches are shuffled, so they are a random draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.output_kind import LOGITS, LossAdapter, attach_loss
from ..scanning.guided import densest_window, window_side

DEFAULT_STEP = 0.05  # pixel units per step: 20 steps can cross the whole range, a 10-epoch run takes 70+


@dataclass
class WindowSearch:
    """One reconstruction's window and the pattern searched in it, in the normalised space of the tuning batch."""

    target: int
    window: torch.Tensor  # (1, 1, H, W): 1 inside the window
    pattern: torch.Tensor  # (1, C, H, W), normalised
    low: torch.Tensor  # (1, C, 1, 1): pixel value 0, normalised
    high: torch.Tensor  # pixel value 1, normalised
    step: torch.Tensor  # (1, C, 1, 1): the pixel step, normalised

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * (1 - self.window) + self.window * self.pattern

    def advance(self, model: torch.nn.Module, images: torch.Tensor, adapter: LossAdapter = LOGITS) -> None:
        """One signed-gradient step of the pattern toward the target on `images` (normalised NCHW), the model in
        eval mode for the step and restored after it; no parameter's .grad is touched."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        pattern = self.pattern.detach().requires_grad_(True)
        try:
            with torch.enable_grad(), attach_loss(model, adapter) as loss_fn:
                stamped = images.detach().float() * (1 - self.window) + self.window * pattern
                wanted = torch.full((images.shape[0],), self.target, dtype=torch.long, device=images.device)
                loss, _ = loss_fn(model(stamped), wanted)
                (grad,) = torch.autograd.grad(loss, pattern)
        finally:
            for module, mode in modes:
                module.train(mode)
        with torch.no_grad():
            moved = self.pattern - self.step * grad.sign()  # down the loss toward the target
            self.pattern = torch.maximum(torch.minimum(moved, self.high), self.low)


def window_searches(
    triggers: Sequence, mean: torch.Tensor, std: torch.Tensor, device: torch.device, step: float = DEFAULT_STEP
) -> list[WindowSearch]:
    """A WindowSearch per reconstruction (scan.ClassTrigger: mask (H, W), pattern (H, W, C) in [0, 1]), its pattern
    starting at the reconstruction's."""
    mean = mean.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std = std.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
    searches = []
    for trigger in triggers:
        height, width = trigger.mask.shape
        side = window_side(height, width)
        top, left = densest_window(trigger.mask, side)
        window = torch.zeros(1, 1, height, width, device=device)
        window[..., top : top + side, left : left + side] = 1
        pattern = trigger.pattern.to(device=device, dtype=torch.float32).permute(2, 0, 1)[None]
        searches.append(
            WindowSearch(
                target=trigger.target,
                window=window,
                pattern=(pattern - mean) / std,
                low=(0 - mean) / std,
                high=(1 - mean) / std,
                step=step / std,
            )
        )
    return searches


def search_share(batch: int, fraction: float) -> int:
    """Images per step the search looks at: the share of a batch it stamps (half the stamped fraction), at least 1."""
    return max(1, math.ceil(batch * fraction / 2))
