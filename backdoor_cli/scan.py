"""Trigger-free backdoor scan: Neural-Cleanse-style trigger inversion with a MAD outlier test.

For every class t we look for the smallest mask m (H x W, values in [0, 1]) and pattern p (H x W x C,
pixel values in [0, 1]) such that  x' = (1 - m) * x + m * p  sends clean images x of other classes
to t (Wang et al., "Neural Cleanse", S&P 2019). A backdoor is a shortcut: its target class needs a
much smaller mask than the others. The outlier test is the median absolute deviation over the
classes' mask L1 norms; a class whose norm is more than `threshold` (2) robust standard deviations
BELOW the median is flagged. Large norms are not suspicious, so only the small side counts.

Unlike Neural Cleanse, the test runs on log(L1): mask sizes are scale quantities whose spread grows
with their level, so on the raw scale a few hard classes (masks of 140-180 pixels) inflate the MAD
enough to hide a 9-pixel BadNets mask among masks of 40-70 (docs/scan.md: measured, index 1.89 raw
against 3.5 on the log scale). The raw Neural Cleanse index is still reported beside it.

Everything here works on a model in eval mode with frozen weights and a few hundred clean images;
the test split and any known trigger are never seen.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ConfigError, InputError
from .precision import exact_fp32

# MAD -> standard deviation for normally distributed data (1 / Phi^-1(3/4)).
MAD_CONSISTENCY = 1.4826
# Neural Cleanse's decision threshold on the anomaly index (about 95% one-sided under normality).
ANOMALY_THRESHOLD = 2.0
MIN_L1 = 1e-3  # floor before the log: a mask of (numerically) zero pixels must not become -inf

LossFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class InversionParams:
    """How hard each class's trigger is searched for. Defaults fit a CIFAR ResNet in minutes on 2 cores."""

    steps: int = 120  # optimisation steps per class at most (early stopping can end sooner)
    batch_size: int = 32  # clean images per step
    lr: float = 0.1  # Adam on the mask and pattern logits
    success: float = 0.95  # attack success a candidate needs before its size counts
    init_cost: float = 1e-3  # first weight of the mask L1 penalty once a candidate succeeds
    cost_step: float = 1.5  # the penalty weight is multiplied (succeeding) or divided (failing) by this
    patience: int = 10  # steps between penalty adjustments
    early_stop: int = 6  # stop a class after this many adjustments without a 2% smaller succeeding mask
    threshold: float = ANOMALY_THRESHOLD

    def validate(self) -> "InversionParams":
        checks = (("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
                  ("success", 0 < self.success <= 1), ("init_cost", self.init_cost > 0),
                  ("cost_step", self.cost_step > 1), ("patience", self.patience >= 1),
                  ("early_stop", self.early_stop >= 1),
                  ("threshold", self.threshold > 0))
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"scan parameter {name} is out of range: {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ClassTrigger:
    """The smallest trigger found for one target class."""

    target: int
    mask: torch.Tensor  # (H, W) float in [0, 1], CPU
    pattern: torch.Tensor  # (H, W, C) float in [0, 1], CPU
    l1: float  # sum of the mask: how many pixels' worth of the image the trigger replaces
    success: float  # fraction of the scan's non-target images the trigger sends to `target`
    reached: bool  # whether any candidate reached InversionParams.success during the search
    steps: int

    def to_dict(self) -> dict:
        return {"class": self.target, "mask_l1": round(self.l1, 3), "success": round(self.success, 4),
                "reached_success": self.reached, "steps": self.steps}


@dataclass
class ScanResult:
    """Per-class triggers, their anomaly indices and the classes the outlier test flags."""

    triggers: list[ClassTrigger]
    anomaly: list[float]  # on log(L1): (median - log l1) / (1.4826 * MAD); positive = smaller than typical
    median_l1: float
    mad: float  # of log(L1)
    threshold: float
    flagged: list[int] = field(default_factory=list)
    anomaly_raw: list[float] = field(default_factory=list)  # Neural Cleanse's index on the raw L1, for reference

    @property
    def rule(self) -> str:
        return (f"a class is flagged when the log of its mask L1 norm lies more than {self.threshold:g} robust "
                f"standard deviations below the median over all classes (anomaly index = (median - log L1) / "
                f"({MAD_CONSISTENCY} x MAD of log L1) > {self.threshold:g}); larger-than-typical masks never flag")


def compose(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p for images x in [0, 1] NCHW, mask (1, 1, H, W) and pattern (1, C, H, W)."""
    return x * (1 - mask) + mask * pattern


def invert_class(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int,
                 mean: torch.Tensor, std: torch.Tensor, loss_fn: LossFn, params: InversionParams,
                 generator: torch.Generator, on_step: Callable[[int], None] | None = None) -> ClassTrigger:
    """Search the smallest mask + pattern sending `images` (uint8 NHWC, not of class `target`) to `target`.

    The penalty weight follows Neural Cleanse's schedule: zero until the trigger works, then raised
    while it keeps working and lowered when it stops, so the search ends near the smallest mask that
    still reaches `params.success`. The best succeeding candidate seen is kept.
    """
    device = images.device
    n, height, width, channels = images.shape
    x01 = images.permute(0, 3, 1, 2).float().div_(255.0)
    # Logits of mask and pattern: sigmoid keeps both in [0, 1] without clipping, which would stall gradients.
    init = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    mask_logit = (torch.randn(1, 1, height, width, generator=init) * 0.1 - 2.0).to(device).requires_grad_(True)
    pattern_logit = (torch.randn(1, channels, height, width, generator=init) * 0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=params.lr, betas=(0.5, 0.9))
    wanted = torch.full((min(params.batch_size, n),), target, dtype=torch.long, device=device)
    cost, hits, seen, stale = 0.0, 0, 0, 0
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    step = 0
    for step in range(1, params.steps + 1):
        pick = torch.randperm(n, generator=generator)[: wanted.shape[0]].to(device)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        output = model((compose(x01[pick], mask, pattern) - mean) / std)
        ce, scores = loss_fn(output, wanted)
        l1 = mask.sum()
        loss = ce + cost * l1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hits += int((scores.argmax(1) == wanted).sum())
        seen += wanted.shape[0]
        if step % params.patience == 0:
            rate, size = hits / seen, l1.item()
            stale += 1
            if rate >= params.success:
                if best is None or size < best[0]:
                    if best is None or size < 0.98 * best[0]:
                        stale = 0
                    best = (size, mask.detach().clone(), pattern.detach().clone())
                cost = params.init_cost if cost == 0 else cost * params.cost_step
            elif cost > 0:
                cost /= params.cost_step ** 1.5  # NC lowers faster than it raises: success matters more than size
            hits = seen = 0
            # Once a trigger works and has stopped shrinking, more steps only cost time.
            if best is not None and stale >= params.early_stop:
                break
        if on_step is not None:
            on_step(step)
    if best is None:
        mask, pattern = torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach()
    else:
        mask, pattern = best[1], best[2]
    success = attack_success(model, x01, target, mask, pattern, mean, std, params.batch_size * 4)
    return ClassTrigger(target=target, mask=mask[0, 0].cpu(), pattern=pattern[0].permute(1, 2, 0).cpu(),
                        l1=float(mask.sum()), success=success, reached=best is not None, steps=step)


@torch.no_grad()
def attack_success(model: torch.nn.Module, x01: torch.Tensor, target: int, mask: torch.Tensor, pattern: torch.Tensor,
                   mean: torch.Tensor, std: torch.Tensor, batch_size: int) -> float:
    """Fraction of images (NCHW in [0, 1]) that the composed trigger sends to `target`."""
    hits = 0
    for start in range(0, x01.shape[0], batch_size):
        batch = compose(x01[start : start + batch_size], mask, pattern)
        with exact_fp32(batch.device):  # a verdict's figure: the model's own fp32 predictions
            hits += int((model((batch - mean) / std).argmax(1) == target).sum())
    return hits / max(1, x01.shape[0])


def anomaly_indices(norms: list[float]) -> tuple[list[float], float, float]:
    """(anomaly index per class, median, MAD). Index = (median - norm) / (1.4826 MAD).

    With a zero MAD (half the classes share one norm) no spread is defined: every index is 0, so
    nothing is flagged rather than everything.
    """
    median = statistics.median(norms)
    mad = statistics.median(abs(v - median) for v in norms)
    if mad <= 1e-12:
        return [0.0] * len(norms), median, mad
    return [(median - v) / (MAD_CONSISTENCY * mad) for v in norms], median, mad


def scan_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               mean: torch.Tensor, std: torch.Tensor, loss_fn: LossFn, params: InversionParams, seed: int,
               on_class: Callable[[ClassTrigger], None] | None = None,
               on_step: Callable[[int], None] | None = None) -> ScanResult:
    """Invert a trigger for every class and flag the outliers. The model's weights are frozen meanwhile."""
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # gradients for the trigger only: no weight gradients to compute or keep
    model.eval()
    triggers = []
    try:
        for target in range(num_classes):
            others = labels != target  # a class's own images say nothing about a shortcut into it
            if int(others.sum()) == 0:
                raise InputError(f"the scan images are all of class {target}; it needs images of other classes")
            done = target * params.steps
            trigger = invert_class(model, images[others], labels[others], target, mean, std, loss_fn, params,
                                   generator, (lambda s, d=done: on_step(d + s)) if on_step else None)
            triggers.append(trigger)
            if on_class is not None:
                on_class(trigger)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    anomaly, log_median, log_mad = anomaly_indices([math.log(max(t.l1, MIN_L1)) for t in triggers])
    raw, _, _ = anomaly_indices([t.l1 for t in triggers])
    flagged = [t.target for t, a in zip(triggers, anomaly) if a > params.threshold and math.isfinite(a)]
    return ScanResult(triggers=triggers, anomaly=anomaly, median_l1=math.exp(log_median), mad=log_mad,
                      threshold=params.threshold, flagged=flagged, anomaly_raw=raw)
