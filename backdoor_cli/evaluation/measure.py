"""Predictions in large batches -> EvalResult (C-Acc, ASR, RA with their counts).

The evaluation sets are built once per run (clean test images, and the triggered copies of the
non-target ones) and reused before and after purification, so both measurements see exactly the
same images. Counts accumulate on the device; the host reads them once at the end.

A large image folder's test split arrives as a FolderStream (data/streaming.py): it is decoded batch by
batch for every evaluation, and the trigger is applied to each batch's non-target images as they
pass, so the counts are those of the resident path on the same images.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from ..data.datasets import ImageSet, normalize, stratified_limit
from ..data.streaming import FolderStream
from ..precision import CHECKED_BF16, as_format, autocast, evaluation_arithmetic, exact_fp32
from ..runtime import synchronize
from .checked import CheckedStats, predict_checked
from .folding import fold_batchnorm
from .metrics import Rate
from .paired import Outcomes

APPLY_CHUNK = 4096  # trigger application is chunked to bound float temporaries (WaNet's grid_sample)


@dataclass
class EvalSets:
    """The images every evaluation of a run uses."""

    clean: ImageSet | FolderStream  # resident on the device, or streamed from disk
    poisoned: ImageSet | None  # resident: triggered non-target-class images, labelled with their TRUE class
    target: int | None
    trigger_name: str | None
    limited: bool = False
    trigger: object | None = None  # streamed: applied per batch (poisoned stays None)

    @property
    def streamed(self) -> bool:
        return isinstance(self.clean, FolderStream)

    @property
    def has_trigger(self) -> bool:
        return self.poisoned is not None or self.trigger is not None

    @property
    def num_poisoned(self) -> int:
        if self.poisoned is not None:
            return self.poisoned.num_images
        return int((self.clean.y != self.target).sum()) if self.trigger is not None else 0


@dataclass
class EvalResult:
    clean_acc: Rate
    asr: Rate | None
    ra: Rate | None
    seconds: float
    images: int
    checked: CheckedStats | None = None  # a checked bf16 evaluation: what ran in fp32 (checked.py)
    # The share of the same non-target images the model sends to the target WITHOUT the trigger: the part of
    # the ASR its own errors give. A weak or target-biased model has a floor here (a purified ResNet-32 that
    # kept a 5.6% ASR sent 3.6% there untriggered), so the trigger's own effect is asr - asr_no_trigger.
    asr_no_trigger: Rate | None = None
    # Image by image, what the counts above add up: lets two evaluations of the same images be compared
    # pairwise (paired.py). None for a result rebuilt from counts alone (the cache reads an entry without it as a
    # miss, so purify and compare always have it).
    outcomes: Outcomes | None = None

    @property
    def trigger_lift(self) -> float | None:
        """What the trigger adds to the model's own rate into the target (fraction; negative: it repels)."""
        if self.asr is None or self.asr_no_trigger is None:
            return None
        return self.asr.value - self.asr_no_trigger.value

    def to_dict(self) -> dict:
        out = {
            "clean_acc": self.clean_acc.to_dict(),
            "asr": self.asr.to_dict() if self.asr else None,
            "asr_no_trigger": self.asr_no_trigger.to_dict() if self.asr_no_trigger else None,
            "ra": self.ra.to_dict() if self.ra else None,
            "seconds": round(self.seconds, 4),
            "images": self.images,
        }
        if self.checked is not None:
            out["arithmetic"] = self.checked.to_dict()
        return out


def build_eval_sets(
    test: ImageSet | FolderStream, trigger, device: torch.device, limit: int | None = None, seed: int = 0
) -> EvalSets:
    """Move the test split to the device and build the triggered set from its non-target images.
    A FolderStream stays on disk: evaluate_model triggers its non-target images batch by batch.

    ASR counts only images whose true class differs from the target: a target-class image
    classified as the target is a correct prediction, not a successful attack.
    """
    limited = False
    if limit is not None and limit < test.num_images:
        test = test.subset(stratified_limit(test.y, limit, seed))
        limited = True
    name = (getattr(trigger.spec, "source", None) or trigger.spec.type) if trigger is not None else None
    if isinstance(test, FolderStream):
        return EvalSets(test, None, trigger.target if trigger else None, name, limited, trigger)
    clean = test.to(device)
    if trigger is None:
        return EvalSets(clean, None, None, None, limited)
    keep = clean.y != trigger.target
    source_x, source_y = clean.x[keep], clean.y[keep]
    chunks = [trigger.apply(source_x[i : i + APPLY_CHUNK]) for i in range(0, len(source_x), APPLY_CHUNK)]
    poisoned_x = torch.cat(chunks) if chunks else source_x
    return EvalSets(clean, ImageSet(poisoned_x, source_y), trigger.target, name, limited)


# Evaluation batch when none is given. On CPU smaller batches keep the activations in cache: measured on
# the 2-core EPYC (fp32, channels_last, CIFAR-10), 128 images per batch ran 1.4x (simple_cnn) and 1.7x
# (ResNet-20) faster than 1024. On CUDA large batches fill the GPU.
EVAL_BATCH = {"cpu": 128, "cuda": 1024}


@torch.no_grad()
def top1_accuracy(
    model: torch.nn.Module, images: ImageSet, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy on `images` in exact fp32 and eval mode; the model's train/eval modes are restored afterwards."""
    correct = 0
    with eval_mode(model):
        for i in range(0, images.num_images, batch_size):
            x, y = images.x[i : i + batch_size], images.y[i : i + batch_size]
            with exact_fp32(x.device):  # the model's own fp32 predictions (no TF32 on CUDA)
                correct += int((model(normalize(x, mean, std)).argmax(1) == y).sum())
    return correct / max(images.num_images, 1)


def eval_batch_size(given: int | None, device: torch.device) -> int:
    """The user's evaluation batch, else the device's default (EVAL_BATCH)."""
    return given if given is not None else EVAL_BATCH.get(device.type, EVAL_BATCH["cuda"])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block; afterwards every module's own flag as it was (a
    BatchNorm the caller froze in a training model stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int | None = None,
    on_batch=None,
    precision: str | None = None,
    memory_format: str = "channels_last",
    stats: CheckedStats | None = None,
) -> torch.Tensor:
    """Class predictions for uint8 NHWC images, in large batches, staying on the device.
    `on_batch(n_images)` is called after each batch is queued (no sync: it only counts).
    `precision`: bf16 autocast, exact fp32 (None: fp32, TF32 off on CUDA), or CHECKED_BF16 (bf16 with
    the near-ties re-run in fp32: fp32's answers, checked.py; `stats` collects what ran);
    `memory_format`: the model's."""
    precision = precision or "fp32"  # evaluation is exact unless bf16 is asked for (precision.py)
    batch_size = eval_batch_size(batch_size, device)
    with eval_mode(model):
        if precision == CHECKED_BF16:
            return _predict_checked(model, x, mean, std, device, batch_size, on_batch, memory_format, stats)
        preds = []
        for start in range(0, len(x), batch_size):
            batch = as_format(
                normalize(x[start : start + batch_size].to(device, non_blocking=True), mean, std), memory_format
            )
            with evaluation_arithmetic(device, precision):
                preds.append(model(batch).argmax(dim=1))
            if on_batch is not None:
                on_batch(len(batch))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def _predict_checked(model, x, mean, std, device, batch_size, on_batch, memory_format, stats) -> torch.Tensor:
    def prepare(images: torch.Tensor) -> torch.Tensor:
        return as_format(normalize(images.to(device, non_blocking=True), mean, std), memory_format)

    def forward_bf16(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device, "bf16"):
            return model(batch)

    def forward_fp32(batch: torch.Tensor) -> torch.Tensor:
        with exact_fp32(device):
            return model(batch)

    return predict_checked(x, batch_size, prepare, forward_bf16, forward_fp32, stats, on_batch)


def evaluate_model(
    model: torch.nn.Module,
    sets: EvalSets,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int | None = None,
    reporter=None,
    precision: str | None = None,
    memory_format: str = "channels_last",
) -> EvalResult:
    """C-Acc on the clean set; ASR and RA on the triggered set when a trigger was given.
    With a `reporter`, a progress bar counts the images (useful on CPU, where this takes a while).
    `batch_size` None: the device's default (EVAL_BATCH); `precision` and `memory_format` as for `predict`."""
    batch_size = eval_batch_size(batch_size, device)
    synchronize(device)
    start = time.perf_counter()
    n_clean, n_poison = sets.clean.num_images, sets.num_poisoned
    total = n_clean + n_poison
    on_batch = None
    if reporter is not None:
        reporter.start_steps("evaluating (images)", total)
        done = {"n": 0}

        def on_batch(n: int) -> None:
            done["n"] += n
            reporter.advance(done["n"])

    checked = CheckedStats() if precision == CHECKED_BF16 else None
    try:
        # The folded copy shares the model's other modules: the model's own modes come back on exit.
        with eval_mode(model):
            # BatchNorm folded into the convolutions (folding.py): the same function, a memory pass fewer.
            runnable = fold_batchnorm(model).model
            count = _streamed_counts if sets.streamed else _resident_counts
            run = functools.partial(predict, precision=precision, memory_format=memory_format, stats=checked)
            counts, correct, hits = count(runnable, sets, mean, std, device, batch_size, on_batch, run)
            counts = counts.tolist()  # one host read
            outcomes = Outcomes(correct.cpu(), None if hits is None else hits.cpu())
    finally:
        if reporter is not None:
            reporter.finish_steps()
    seconds = time.perf_counter() - start
    if not sets.has_trigger:
        return EvalResult(Rate(counts[0], n_clean), None, None, seconds, n_clean, checked, outcomes=outcomes)
    return EvalResult(
        Rate(counts[0], n_clean),
        Rate(counts[1], n_poison),
        Rate(counts[2], n_poison),
        seconds,
        n_clean + n_poison,
        checked,
        asr_no_trigger=Rate(counts[3], n_poison),
        outcomes=outcomes,
    )


def _resident_counts(model, sets: EvalSets, mean, std, device, batch_size: int, on_batch, predict):
    """([clean correct, target hits, robust, untriggered target hits], per-image clean correctness, per-image
    target hits of the triggered images or None) on the device, for sets held in memory."""
    counts = torch.zeros(4, dtype=torch.long, device=device)
    clean = predict(model, sets.clean.x, mean, std, device, batch_size, on_batch)
    correct = clean == sets.clean.y
    counts[0] = correct.sum()
    hits = None
    if sets.poisoned is not None:
        preds = predict(model, sets.poisoned.x, mean, std, device, batch_size, on_batch)
        hits = preds == sets.target
        counts[1] = hits.sum()
        counts[2] = (preds == sets.poisoned.y).sum()
        # the triggered set is exactly the clean set's non-target images (build_eval_sets)
        counts[3] = ((clean == sets.target) & (sets.clean.y != sets.target)).sum()
    return counts, correct, hits


def _streamed_counts(model, sets: EvalSets, mean, std, device, batch_size: int, on_batch, predict):
    """The same counts and per-image results for a FolderStream: each decoded batch is predicted clean, then its
    non-target images with the trigger applied, and dropped before the next batch is taken."""
    counts = torch.zeros(4, dtype=torch.long, device=device)
    correct, hits = [], []
    for x, y in sets.clean.batches(batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        clean = predict(model, x, mean, std, device, batch_size, on_batch)
        correct.append(clean == y)
        counts[0] += correct[-1].sum()
        if sets.trigger is not None:
            keep = y != sets.target
            counts[3] += (clean[keep] == sets.target).sum()
            preds = predict(model, sets.trigger.apply(x[keep]), mean, std, device, batch_size, on_batch)
            hits.append(preds == sets.target)
            counts[1] += hits[-1].sum()
            counts[2] += (preds == y[keep]).sum()
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    target_hits = (torch.cat(hits) if hits else empty) if sets.trigger is not None else None
    return counts, (torch.cat(correct) if correct else empty), target_hits
