"""The change of a rate between two models measured on the same images, with a paired 95% interval.

`purify` scores the input and the purified model on the same test images, so their accuracies are not two
independent samples: most images are right (or wrong) for both, and only the images where they disagree carry
the change. Two Wilson intervals side by side overstate its uncertainty several-fold, and a bare difference
understates it: on 2,000 images a purified ResNet-32 measured 3.45 points below its input, and 1.76 on all 9,000
images of the same split (docs/purification.md, fourteenth session). The interval here is Newcombe's hybrid
score interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10): the two
Wilson intervals combined through the correlation of the paired outcomes. It stays inside [-1, 1] and is
sensible when few images disagree, where the normal approximation is not.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import torch

from .metrics import Z95, wilson_interval


@dataclass(frozen=True)
class Outcomes:
    """Per-image results behind an evaluation's counts, on the CPU in the evaluation's image order: whether each
    clean image was classified correctly and, with a trigger, whether each triggered non-target image was sent
    to the target. Two evaluations of the same images pair image by image."""

    clean_correct: torch.Tensor  # bool (n_clean,)
    target_hits: torch.Tensor | None = None  # bool (n_poisoned,)

    def to_dict(self) -> dict:
        """Packed bits in base64 (an evaluation cache entry; 10,000 images take 1.7 KB)."""
        return {
            "clean_correct": pack_bits(self.clean_correct),
            "target_hits": None if self.target_hits is None else pack_bits(self.target_hits),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Outcomes:
        hits = data.get("target_hits")
        return cls(unpack_bits(data["clean_correct"]), None if hits is None else unpack_bits(hits))


def pack_bits(bits: torch.Tensor) -> dict:
    flat = bits.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return {"n": int(flat.size), "bits": base64.b64encode(np.packbits(flat).tobytes()).decode("ascii")}


def unpack_bits(data: dict) -> torch.Tensor:
    n = int(data["n"])
    packed = np.frombuffer(base64.b64decode(data["bits"]), dtype=np.uint8)
    if packed.size != (n + 7) // 8:
        raise ValueError(f"packed outcomes hold {packed.size} bytes for {n} images")
    return torch.from_numpy(np.unpackbits(packed)[:n].astype(bool))


@dataclass(frozen=True)
class PairedChange:
    """How a rate changed between two models on the same n images: `gained` images counted only after,
    `lost` only before, `both` by both. The change is (gained - lost) / n."""

    n: int
    both: int
    lost: int
    gained: int

    @property
    def neither(self) -> int:
        return self.n - self.both - self.lost - self.gained

    @property
    def value(self) -> float:
        return (self.gained - self.lost) / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return newcombe_paired_interval(self.both, self.gained, self.lost, self.neither)

    def to_dict(self) -> dict:
        low, high = self.interval
        return {
            "n": self.n,
            "lost": self.lost,
            "gained": self.gained,
            "value": round(self.value, 6),
            "ci95": [round(low, 6), round(high, 6)],
        }


def paired_change(before: torch.Tensor, after: torch.Tensor) -> PairedChange:
    """The change from `before` to `after`, two bool vectors over the same images in the same order."""
    before, after = before.to("cpu", torch.bool).reshape(-1), after.to("cpu", torch.bool).reshape(-1)
    if before.shape != after.shape:
        raise ValueError(f"paired outcomes differ in length: {before.numel()} and {after.numel()} images")
    return PairedChange(
        n=int(before.numel()),
        both=int((before & after).sum()),
        lost=int((before & ~after).sum()),
        gained=int((~before & after).sum()),
    )


def newcombe_paired_interval(
    both: int, first_only: int, second_only: int, neither: int, z: float = Z95
) -> tuple[float, float]:
    """95% interval for p1 - p2, where p1 = (both + first_only) / n and p2 = (both + second_only) / n are two
    rates measured on the same n items (Newcombe 1998, method 10). With n = 0: [-1, 1]."""
    n = both + first_only + second_only + neither
    if n <= 0:
        return -1.0, 1.0
    k1, k2 = both + first_only, both + second_only
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, z)
    l2, u2 = wilson_interval(k2, n, z)
    # the phi coefficient of the 2 x 2 table; 0 where a margin is empty (one model right on every item)
    margins = k1 * (n - k1) * k2 * (n - k2)
    phi = (both * neither - first_only * second_only) / math.sqrt(margins) if margins > 0 else 0.0
    theta = p1 - p2
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - down), min(1.0, theta + up)


def outcome_changes(before: Outcomes | None, after: Outcomes | None) -> dict[str, PairedChange] | None:
    """{"clean_acc": ..., "asr": ...}: the paired change of each rate that both evaluations kept image by image
    ("asr" only with a trigger); None when either has no outcomes."""
    if before is None or after is None:
        return None
    changes = {"clean_acc": paired_change(before.clean_correct, after.clean_correct)}
    if before.target_hits is not None and after.target_hits is not None:
        changes["asr"] = paired_change(before.target_hits, after.target_hits)
    return changes
