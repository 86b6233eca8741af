"""Checked bf16 evaluation: bf16 predictions, with every image whose answer bf16 could have changed
re-run in fp32, so the predictions are the fp32 forward's.

bf16 (8-bit mantissa) moves a network's logits by a small fraction of their size; it can change a
prediction only where the top two logits are closer than that error. So:
1. every batch runs under bf16 autocast; each image keeps its bf16 class, its top-2 margin and its
   logit scale (the largest |logit|);
2. the first batch of each call and every CHECK_EVERY-th after it also run in fp32: there the answer
   is fp32's, and the worst relative error of bf16's logit differences is measured;
3. at the end every image whose bf16 margin is at most CHECK_SAFETY x that worst error x its own
   scale (never less than bf16's unit roundoff) is re-run in fp32, and takes fp32's answer;
4. when most of the first batch would be re-run (DIRECT_SHARE), the rest of the call runs in fp32
   alone: a near-tied model gets fp32's answers at fp32's cost, not more.

An image keeps its bf16 answer only when its margin is CHECK_SAFETY times larger than any error seen
on the sampled images. This is a measured bound, not a proof: the study in docs/performance.md
compared it with the full fp32 forward image for image on real models and on near-tied ones.
What ran (images in fp32, the bound) is recorded with each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One batch in this many (and the first of each call) also runs in fp32: the error sample.
CHECK_EVERY = 16
# An image keeps its bf16 class only if its top-2 margin exceeds this many times the worst relative
# error measured on the sampled batches (times the image's own logit scale). Measured on three CIFAR-10
# models' full test sets (benchmarks/checked_safety.py): 0 of 83 bf16 flips kept from K = 1 up; at 4,
# the closest image kept had a bf16 error of 0.29 of its margin (3.4x headroom), and 12-15% of a
# ResNet-20's images ran in fp32 (53% for a weak simple_cnn, whose logits are close together).
CHECK_SAFETY = 4.0
# When more than this share of the first (sampled) batch would be re-run in fp32, the rest of the call
# runs in fp32 directly: a bf16 pass plus re-runs of most images would cost more than fp32 alone (a
# weak or near-tied model, e.g. the make-bench subject after FST at 34% accuracy).
DIRECT_SHARE = 0.4
# The relative error bound never goes below bf16's unit roundoff (2^-8): a sample that happened to
# show no error does not switch the re-check off.
ERROR_FLOOR = 2.0**-8


@dataclass
class CheckedStats:
    """What a checked evaluation ran: summed over its calls (clean and triggered images)."""

    images: int = 0
    sampled: int = 0  # images of the fp32 error-sample batches
    rechecked: int = 0  # near-ties re-run in fp32 after the bf16 pass
    direct: int = 0  # images run in fp32 only (after a first batch of mostly near-ties: DIRECT_SHARE)
    worst_error: float = 0.0  # largest relative error of bf16's logit differences on the sample
    changed: int = 0  # images where fp32 gave another class than bf16 (sample + re-checked)

    def to_dict(self) -> dict:
        return {
            "mode": "bf16, near-ties re-run in fp32",
            "images": self.images,
            "fp32_images": self.sampled + self.rechecked + self.direct,
            "sampled": self.sampled,
            "rechecked": self.rechecked,
            "fp32_only": self.direct,
            "bf16_answers_changed_by_fp32": self.changed,
            "worst_relative_error": round(self.worst_error, 6),
            "safety_factor": CHECK_SAFETY,
        }

    @classmethod
    def from_dict(cls, record: dict) -> CheckedStats:
        """to_dict() read back (the evaluation cache keeps it: a cached figure says how it was computed too)."""
        return cls(
            images=int(record["images"]),
            sampled=int(record["sampled"]),
            rechecked=int(record["rechecked"]),
            direct=int(record["fp32_only"]),
            worst_error=float(record["worst_relative_error"]),
            changed=int(record["bf16_answers_changed_by_fp32"]),
        )


def predict_checked(
    x: torch.Tensor,
    batch_size: int,
    prepare,
    forward_bf16,
    forward_fp32,
    stats: CheckedStats | None = None,
    on_batch=None,
) -> torch.Tensor:
    """Class predictions equal to `forward_fp32`'s for the images `x`: bf16 for every batch, fp32 for
    the sampled batches and for the near-ties. `prepare` turns a slice of `x` into the model's input
    batch; `forward_*` map an input batch to logits; `on_batch(n)` counts the images of the bf16 pass."""
    preds, margins, scales, settled = [], [], [], []  # settled: the answer is already fp32's
    worst, direct = 0.0, False
    counts = {"sampled": 0, "direct": 0}
    for index, begin in enumerate(range(0, len(x), batch_size)):
        batch = prepare(x[begin : begin + batch_size])
        if direct:  # most images would be re-run anyway: fp32 alone is cheaper than bf16 plus re-runs
            preds.append(forward_fp32(batch).float().argmax(1))
            margins.append(torch.zeros(len(batch), device=preds[-1].device))
            scales.append(torch.ones(len(batch), device=preds[-1].device))
            settled.append(torch.ones(len(batch), dtype=torch.bool, device=preds[-1].device))
            counts["direct"] += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
            continue
        low = forward_bf16(batch).float()
        scale = low.abs().amax(dim=1)
        if low.shape[1] > 1:
            top = low.topk(2, dim=1).values
            margin = top[:, 0] - top[:, 1]
        else:
            margin = torch.full_like(scale, float("inf"))
        is_sample = index % CHECK_EVERY == 0
        if is_sample:
            high = forward_fp32(batch).float()
            worst = max(worst, _relative_error(low, high, scale))
            if stats is not None:
                stats.changed += int((high.argmax(1) != low.argmax(1)).sum())
            preds.append(high.argmax(1))
        else:
            preds.append(low.argmax(1))
        margins.append(margin)
        scales.append(scale)
        settled.append(torch.full_like(margin, is_sample, dtype=torch.bool))
        counts["sampled"] += len(batch) if is_sample else 0
        if index == 0:
            direct = float(_near(margin, scale, worst).float().mean()) > DIRECT_SHARE
        if on_batch is not None:
            on_batch(len(batch))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=x.device)
    pred, margin, scale, was_settled = torch.cat(preds), torch.cat(margins), torch.cat(scales), torch.cat(settled)
    near = (_near(margin, scale, worst) & ~was_settled).nonzero().flatten()
    for begin in range(0, len(near), batch_size):
        rows = near[begin : begin + batch_size]
        high = forward_fp32(prepare(x[rows.to(x.device)])).float().argmax(1).to(pred.device)
        if stats is not None:
            stats.changed += int((high != pred[rows]).sum())
        pred[rows] = high
    if stats is not None:
        stats.images += len(pred)
        stats.sampled += counts["sampled"]
        stats.direct += counts["direct"]
        stats.rechecked += len(near)
        stats.worst_error = max(stats.worst_error, worst)
    return pred


def _near(margin: torch.Tensor, scale: torch.Tensor, worst: float) -> torch.Tensor:
    """The images whose bf16 answer bf16's error could have changed. `<=`: a zero margin (a tie in bf16)
    is always re-run, whatever the scale."""
    return margin <= CHECK_SAFETY * max(worst, ERROR_FLOOR) * scale


def _relative_error(low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor) -> float:
    """The worst, over the images, of max_j |(low_c - low_j) - (high_c - high_j)| / scale, c = bf16's class:
    how far bf16 moved the differences that decide the answer, relative to the image's logit size."""
    top = low.argmax(1, keepdim=True)
    diff_low = low.gather(1, top) - low
    diff_high = high.gather(1, top) - high
    error = (diff_low - diff_high).abs().amax(1) / scale.clamp_min(torch.finfo(torch.float32).tiny)
    return float(error.max()) if error.numel() else 0.0
