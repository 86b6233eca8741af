"""Predictions in large batches -> EvalResult (C-Acc, ASR, RA with their counts).

The evaluation sets are built once per run (clean test images, and the triggered copies of the
non-target ones) and reused before and after purification, so both measurements see exactly the
same images. Counts accumulate on the device; the host reads them once at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data import ImageSet, normalize, stratified_limit
from .metrics import Rate
from .runtime import autocast, synchronize

APPLY_CHUNK = 4096  # trigger application is chunked to bound float temporaries (WaNet's grid_sample)


@dataclass
class EvalSets:
    """The images every evaluation of a run uses."""

    clean: ImageSet
    poisoned: ImageSet | None  # triggered non-target-class images, labelled with their TRUE class
    target: int | None
    trigger_name: str | None
    limited: bool = False


@dataclass
class EvalResult:
    clean_acc: Rate
    asr: Rate | None
    ra: Rate | None
    seconds: float
    images: int

    def to_dict(self) -> dict:
        return {
            "clean_acc": self.clean_acc.to_dict(),
            "asr": self.asr.to_dict() if self.asr else None,
            "ra": self.ra.to_dict() if self.ra else None,
            "seconds": round(self.seconds, 4),
            "images": self.images,
        }


def build_eval_sets(test: ImageSet, trigger, device: torch.device, limit: int | None = None, seed: int = 0) -> EvalSets:
    """Move the test split to the device and build the triggered set from its non-target images.

    ASR counts only images whose true class differs from the target: a target-class image
    classified as the target is a correct prediction, not a successful attack.
    """
    limited = False
    if limit is not None and limit < test.num_images:
        test = test.subset(stratified_limit(test.y, limit, seed))
        limited = True
    clean = test.to(device)
    if trigger is None:
        return EvalSets(clean, None, None, None, limited)
    keep = clean.y != trigger.target
    source_x, source_y = clean.x[keep], clean.y[keep]
    chunks = [trigger.apply(source_x[i : i + APPLY_CHUNK]) for i in range(0, len(source_x), APPLY_CHUNK)]
    poisoned_x = torch.cat(chunks) if chunks else source_x
    name = getattr(trigger.spec, "source", None) or trigger.spec.type
    return EvalSets(clean, ImageSet(poisoned_x, source_y), trigger.target, name, limited)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            device: torch.device, batch_size: int = 1024, on_batch=None) -> torch.Tensor:
    """Class predictions for uint8 NHWC images, in large batches, staying on the device.
    `on_batch(n_images)` is called after each batch is queued (no sync: it only counts)."""
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(x), batch_size):
        batch = normalize(x[start : start + batch_size].to(device, non_blocking=True), mean, std)
        with autocast(device):
            preds.append(model(batch).argmax(dim=1))
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def evaluate_model(model: torch.nn.Module, sets: EvalSets, mean: torch.Tensor, std: torch.Tensor,
                   device: torch.device, batch_size: int = 1024, reporter=None) -> EvalResult:
    """C-Acc on the clean set; ASR and RA on the triggered set when a trigger was given.
    With a `reporter`, a progress bar counts the images (useful on CPU, where this takes a while)."""
    synchronize(device)
    start = time.perf_counter()
    total = sets.clean.num_images + (sets.poisoned.num_images if sets.poisoned is not None else 0)
    on_batch = None
    if reporter is not None:
        reporter.start_steps("evaluating (images)", total)
        done = {"n": 0}

        def on_batch(n: int) -> None:
            done["n"] += n
            reporter.advance(done["n"])
    try:
        clean_correct = (predict(model, sets.clean.x, mean, std, device, batch_size, on_batch) == sets.clean.y).sum()
        hits = robust = None
        if sets.poisoned is not None:
            preds = predict(model, sets.poisoned.x, mean, std, device, batch_size, on_batch)
            hits = (preds == sets.target).sum()
            robust = (preds == sets.poisoned.y).sum()
        # One host transfer for all counts.
        counts = torch.stack([c for c in (clean_correct, hits, robust) if c is not None]).tolist()
    finally:
        if reporter is not None:
            reporter.finish_steps()
    seconds = time.perf_counter() - start
    n_clean = sets.clean.num_images
    if sets.poisoned is None:
        return EvalResult(Rate(counts[0], n_clean), None, None, seconds, n_clean)
    n_poison = sets.poisoned.num_images
    return EvalResult(Rate(counts[0], n_clean), Rate(counts[1], n_poison), Rate(counts[2], n_poison),
                      seconds, n_clean + n_poison)
