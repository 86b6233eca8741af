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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError, InputError
from ..precision import autocast, exact_fp32

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
    # Classes inverted together in one batch (each with its own mask, pattern and images): one forward
    # pass of group x batch_size images per step instead of one per class, which a GPU runs in the time
    # of one and a CPU faster per image. Adam is elementwise and the loss a sum of per-class terms, so
    # grouping changes the random draws, not the search.
    group: int = 16
    # Many classes (a 100- or 1,000-class hub model): a short search of every class ranks them, and only
    # the `screen_keep` smallest masks (the candidates) and `screen_reference` other classes drawn at
    # random are searched in full. The median and MAD come from the random sample, an unbiased draw of
    # the classes, and only a fully searched candidate can be flagged. The short search only ranks, so it
    # draws fewer images per class (`screen_batch`) and puts more classes in a batch (`screen_group`): the
    # same images per step as a full group-step. Cost for C classes (in group-steps): ceil(C / screen_group)
    # x screen_steps + ceil((keep + reference) / group) x steps instead of ceil(C / group) x steps.
    screen_above: int = 32  # more classes than this are pre-screened; up to it every class is searched in full
    screen_steps: int = 30
    screen_keep: int = 8
    screen_reference: int = 24
    screen_batch: int = 8  # images per class in each step of the short search
    screen_group: int = 64  # classes per batch in the short search (64 x 8 = 16 x 32 images a step)

    def validate(self) -> InversionParams:
        checks = (
            ("steps", self.steps >= 1),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0),
            ("success", 0 < self.success <= 1),
            ("init_cost", self.init_cost > 0),
            ("cost_step", self.cost_step > 1),
            ("patience", self.patience >= 1),
            ("early_stop", self.early_stop >= 1),
            ("group", self.group >= 1),
            ("threshold", self.threshold > 0),
            ("screen_above", self.screen_above >= 2),
            ("screen_steps", self.screen_steps >= 1),
            ("screen_keep", self.screen_keep >= 1),
            ("screen_reference", self.screen_reference >= 3),
            ("screen_batch", self.screen_batch >= 1),
            ("screen_group", self.screen_group >= 1),
        )
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"scan parameter {name} is out of range: {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def screens(self, num_classes: int) -> bool:
        return num_classes > self.screen_above

    def planned_steps(self, num_classes: int) -> int:
        """Group-steps of a scan of `num_classes` classes at most (its progress bar's length)."""
        groups = lambda count, size: -(-count // size)  # noqa: E731 - ceil division, said once
        if not self.screens(num_classes):
            return groups(num_classes, self.group) * self.steps
        full = min(num_classes, self.screen_keep + self.screen_reference)
        return groups(num_classes, self.screen_group) * self.screen_steps + groups(full, self.group) * self.steps

    def screening(self) -> InversionParams:
        """The short search's parameters: fewer steps, fewer images per class, more classes per batch."""
        return replace(self, steps=self.screen_steps, batch_size=self.screen_batch, group=self.screen_group)


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
        return {
            "class": self.target,
            "mask_l1": round(self.l1, 3),
            "success": round(self.success, 4),
            "reached_success": self.reached,
            "steps": self.steps,
        }


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
    # With a pre-screen (InversionParams.screen_above): the classes searched in full as candidates and as
    # the random reference sample; every other class had the short search only. Empty: all in full.
    candidates: list[int] = field(default_factory=list)
    reference: list[int] = field(default_factory=list)
    # the scan cache's entry this result was read from (scanning/cache.py); None: searched in this run
    cached: str | None = None

    @property
    def screened(self) -> bool:
        return bool(self.reference)

    def searched_in_full(self, target: int) -> bool:
        return not self.screened or target in self.candidates or target in self.reference

    @property
    def rule(self) -> str:
        population = (
            "a random sample of " + str(len(self.reference)) + " classes searched in full"
            if self.screened
            else "all classes"
        )
        text = (
            f"a class is flagged when the log of its mask L1 norm lies more than {self.threshold:g} robust "
            f"standard deviations below the median over {population} (anomaly index = (median - log L1) / "
            f"({MAD_CONSISTENCY} x MAD of log L1) > {self.threshold:g}); larger-than-typical masks never flag"
        )
        if self.screened:
            text += (
                f"; a short search of every class picked the {len(self.candidates)} smallest masks as "
                "candidates, and only a candidate searched in full can be flagged"
            )
        return text


def compose(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p for images x in [0, 1] NCHW, mask (1, 1, H, W) and pattern (1, C, H, W)."""
    return x * (1 - mask) + mask * pattern


def per_image(values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """values[owner]: each image's row of its class's mask or pattern, with a backward pass that adds each class's
    images up in the same order on every run.

    On a CPU, indexing's backward (index_put_ with accumulate) adds in parallel with atomics once the rows hold
    32,768 values and torch has two threads or more: a class whose images the threads share is then added up in
    an order that depends on their timing, and the whole search with it (measured on the 2-core EPYC: a re-scan
    of one class of the same purified ResNet-20 found a mask L1 of 83.5, then 85.3; one step's mask gradient
    differed in every process). index_select's backward (index_add_) adds in image order: bit for bit what
    indexing gives with one thread, and what it gave with two where no class was shared (a group of 10 classes
    of 32 images), so those scans are unchanged. On CUDA the roles swap (index_add_ adds with atomics, indexing's
    backward sorts first: both listed in torch.use_deterministic_algorithms), so there the indexing stays."""
    return values.index_select(0, owner) if values.device.type == "cpu" else values[owner]


def invert_classes(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: list[int],
    mean: torch.Tensor,
    std: torch.Tensor,
    loss_fn: LossFn,
    params: InversionParams,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
    precision: str = "fp32",
) -> list[ClassTrigger]:
    """Search, for each of `targets`, the smallest mask + pattern sending images (uint8 NHWC) of other
    classes to it. Each target has its own mask, pattern, penalty weight and images, and all of them go
    through the model in one batch.

    The penalty weight follows Neural Cleanse's schedule: zero until the trigger works, then raised
    while it keeps working and lowered when it stops, so the search ends near the smallest mask that
    still reaches `params.success`. The best succeeding candidate seen is kept.

    The loss is the mean over targets of (cross-entropy_t + cost_t * L1_t), so each target's gradient
    is its own search's, scaled by 1/len(targets), which Adam (elementwise, scale-free) ignores. The
    penalty schedule and early stopping run per target, read back once every `patience` steps; a
    target that stops leaves the batch. `precision` is the forward's autocast (the search's arithmetic;
    the success figures below are fp32 whatever it is)."""
    device = images.device
    n, height, width, channels = images.shape
    x01 = images.permute(0, 3, 1, 2).float().div_(255.0)
    count = len(targets)
    pools = [torch.nonzero(labels != t).flatten() for t in targets]
    for t, pool in zip(targets, pools):
        if pool.numel() == 0:
            raise InputError(f"the scan images are all of class {t}; it needs images of other classes")
    init = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    mask_logit = (torch.randn(count, 1, height, width, generator=init) * 0.1 - 2.0).to(device).requires_grad_(True)
    pattern_logit = (torch.randn(count, channels, height, width, generator=init) * 0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=params.lr, betas=(0.5, 0.9))
    per = [min(params.batch_size, int(pool.numel())) for pool in pools]
    cost = [0.0] * count
    stale = [0] * count
    steps = [0] * count
    best: list[tuple[float, torch.Tensor, torch.Tensor] | None] = [None] * count
    active = list(range(count))
    hits = torch.zeros(count, device=device, dtype=torch.long)
    seen = [0] * count
    for step in range(1, params.steps + 1):
        rows = torch.tensor(active, device=device)
        picks = torch.cat([pools[k][torch.randperm(len(pools[k]), generator=generator)[: per[k]]] for k in active])
        owner = torch.cat([torch.full((per[k],), i, dtype=torch.long) for i, k in enumerate(active)]).to(device)
        wanted = torch.tensor([targets[k] for k in active for _ in range(per[k])], device=device)
        mask, pattern = torch.sigmoid(mask_logit[rows]), torch.sigmoid(pattern_logit[rows])
        batch = compose(x01[picks.to(device)], per_image(mask, owner), per_image(pattern, owner))
        with autocast(device, precision):
            output = model((batch - mean) / std)
        ce, scores = loss_fn(output, wanted)
        l1 = mask.flatten(1).sum(1)
        weights = torch.tensor([cost[k] for k in active], device=device)
        loss = ce + (weights * l1).sum() / len(active)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hits.index_add_(0, rows[owner], (scores.argmax(1) == wanted).long())
        for k in active:
            seen[k] += per[k]
            steps[k] = step
        if step % params.patience == 0:
            rates = (hits.float() / torch.tensor([max(1, s) for s in seen], device=device)).tolist()
            sizes = l1.detach().tolist()
            finished = []
            for i, k in enumerate(active):
                stale[k] += 1
                if rates[k] >= params.success:
                    if best[k] is None or sizes[i] < best[k][0]:
                        if best[k] is None or sizes[i] < 0.98 * best[k][0]:
                            stale[k] = 0
                        best[k] = (sizes[i], mask[i].detach().clone(), pattern[i].detach().clone())
                    cost[k] = params.init_cost if cost[k] == 0 else cost[k] * params.cost_step
                elif cost[k] > 0:
                    cost[k] /= params.cost_step**1.5  # NC lowers faster than it raises: success matters more than size
                seen[k] = 0
                # Once a trigger works and has stopped shrinking, more steps only cost time.
                if best[k] is not None and stale[k] >= params.early_stop:
                    finished.append(k)
            hits.zero_()
            active = [k for k in active if k not in finished]
        if on_step is not None:
            on_step(step)
        if not active:
            break
    found = []
    for k, target in enumerate(targets):
        if best[k] is None:
            mask, pattern = torch.sigmoid(mask_logit[k]).detach(), torch.sigmoid(pattern_logit[k]).detach()
        else:
            mask, pattern = best[k][1], best[k][2]
        others = x01[pools[k]]
        success = attack_success(model, others, target, mask[None], pattern[None], mean, std, params.batch_size * 4)
        found.append(
            ClassTrigger(
                target=target,
                mask=mask[0].cpu(),
                pattern=pattern.permute(1, 2, 0).cpu(),
                l1=float(mask.sum()),
                success=success,
                reached=best[k] is not None,
                steps=steps[k],
            )
        )
    return found


@torch.no_grad()
def count_hits(
    model: torch.nn.Module,
    images: torch.Tensor,
    target: int,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    channels_last: bool = False,
) -> int:
    """How many images the composed trigger sends to `target`: NCHW floats in [0, 1], or uint8 NHWC with
    `channels_last` (converted a batch at a time)."""
    hits = 0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        x01 = chunk.permute(0, 3, 1, 2).float().div_(255.0) if channels_last else chunk
        batch = compose(x01, mask, pattern)
        with exact_fp32(batch.device):  # a verdict's figure: the model's own fp32 predictions
            hits += int((model((batch - mean) / std).argmax(1) == target).sum())
    return hits


def attack_success(
    model: torch.nn.Module,
    x01: torch.Tensor,
    target: int,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
) -> float:
    """Fraction of images (NCHW in [0, 1]) that the composed trigger sends to `target`."""
    return count_hits(model, x01, target, mask, pattern, mean, std, batch_size) / max(1, x01.shape[0])


def anomaly_indices(norms: list[float]) -> tuple[list[float], float, float]:
    """(anomaly index per class, median, MAD). Index = (median - norm) / (1.4826 MAD).

    With a zero MAD (half the classes share one norm) no spread is defined: every index is 0, so
    nothing is flagged rather than everything.
    """
    median = statistics.median(norms)
    mad = statistics.median(abs(v - median) for v in norms)
    return indices_against(norms, median, mad), median, mad


def scan_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    loss_fn: LossFn,
    params: InversionParams,
    seed: int,
    on_class: Callable[[ClassTrigger], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    precision: str = "fp32",
) -> ScanResult:
    """Invert a trigger for every class (params.group classes per batch) and flag the outliers; with more
    than params.screen_above classes, a short search of all of them picks what is searched in full. The
    model's weights are frozen meanwhile. `precision`: the search's forward arithmetic (fp32 | bf16)."""
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # gradients for the trigger only: no weight gradients to compute or keep
    model.eval()
    done = [0]

    def search(targets: list[int], search_params: InversionParams, announce: bool) -> list[ClassTrigger]:
        found: list[ClassTrigger] = []
        # a class's own images say nothing about a shortcut into it: each target draws from the others
        for start in range(0, len(targets), search_params.group):
            offset = done[0]
            group = invert_classes(
                model,
                images,
                labels,
                targets[start : start + search_params.group],
                mean,
                std,
                loss_fn,
                search_params,
                generator,
                (lambda s, d=offset: on_step(d + s)) if on_step else None,
                precision,
            )
            done[0] += search_params.steps
            found.extend(group)
            if announce and on_class is not None:
                for trigger in group:
                    on_class(trigger)
        return found

    candidates: list[int] = []
    reference: list[int] = []
    try:
        if not params.screens(num_classes):
            triggers = search(list(range(num_classes)), params, announce=True)
        else:
            triggers = search(list(range(num_classes)), params.screening(), announce=False)
            order = sorted(range(num_classes), key=lambda c: (triggers[c].l1, c))
            candidates = sorted(order[: params.screen_keep])
            rest = order[params.screen_keep :]
            draw = torch.randperm(len(rest), generator=generator)[: params.screen_reference].tolist()
            reference = sorted(rest[i] for i in draw)
            for trigger in search(candidates + reference, params, announce=True):
                triggers[trigger.target] = trigger
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return score_triggers(triggers, params.threshold, candidates, reference)


def score_triggers(
    triggers: list[ClassTrigger], threshold: float, candidates: list[int], reference: list[int]
) -> ScanResult:
    """The outlier test on searched triggers (one per class, in class order): anomaly indices on log(L1) against
    the median and MAD of `reference` (every class when it is empty), and the flagged classes (only a candidate
    may be flagged after a pre-screen). A scan read back from the cache is scored here too, by the same rule."""
    num_classes = len(triggers)
    logs = [math.log(max(t.l1, MIN_L1)) for t in triggers]
    population = reference or list(range(num_classes))
    _, log_median, log_mad = anomaly_indices([logs[c] for c in population])
    anomaly = indices_against(logs, log_median, log_mad)
    raw_values = [t.l1 for t in triggers]
    _, raw_median, raw_mad = anomaly_indices([raw_values[c] for c in population])
    raw = indices_against(raw_values, raw_median, raw_mad)
    eligible = set(candidates) if reference else set(range(num_classes))
    flagged = [
        t.target for t, a in zip(triggers, anomaly) if t.target in eligible and a > threshold and math.isfinite(a)
    ]
    return ScanResult(
        triggers=triggers,
        anomaly=anomaly,
        median_l1=math.exp(log_median),
        mad=log_mad,
        threshold=threshold,
        flagged=flagged,
        anomaly_raw=raw,
        candidates=list(candidates),
        reference=list(reference),
    )


def indices_against(values: list[float], median: float, mad: float) -> list[float]:
    """Each value's anomaly index against a given median and MAD (0 for all where the MAD is zero)."""
    if mad <= 1e-12:
        return [0.0] * len(values)
    return [(median - v) / (MAD_CONSISTENCY * mad) for v in values]
