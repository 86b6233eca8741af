"""Which augmentation tuning uses, decided from the data unless --augment/--no-augment says.

The default crop (4-pixel zero padding, a random 28x28 or 32x32 window) and horizontal flip suit
CIFAR-like photos. On single-channel images (digits, letters, documents) both do harm: a flip turns
a 2 into something else, and a 4-pixel shift pushes strokes off a 28-pixel frame that the model never
saw cropped. Measured on MNIST (docs/purification.md, "Models that end in a softmax"): the crop alone
cost the recommended recipe its model (8.9% against 88.8% without it) on a softmax-trained CNN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .datasets import DatasetBundle


@dataclass(frozen=True)
class Augmentation:
    """What tuning does to each clean batch, and why."""

    crop: bool
    flip: bool
    decided_by: str  # 'data' | 'flag'
    reason: str

    @property
    def enabled(self) -> bool:
        return self.crop or self.flip

    def describe(self) -> str:
        parts = [name for name, on in (("random crop", self.crop), ("horizontal flip", self.flip)) if on]
        return f"{' + '.join(parts) if parts else 'none'} ({self.reason})"

    def to_dict(self) -> dict:
        return asdict(self)


def flips_allowed(bundle: DatasetBundle) -> bool:
    """A flip keeps the label: the dataset's own rule, and never for single-channel images."""
    return bundle.augment_flip and bundle.test.image_shape[2] != 1


def decide_augmentation(flag: bool | None, bundle: DatasetBundle) -> Augmentation:
    """`flag` is --augment (True), --no-augment (False) or neither (None: from the data)."""
    flip = flips_allowed(bundle)
    if flag is False:
        return Augmentation(False, False, "flag", "--no-augment")
    if flag is True:
        why = "--augment" + ("" if flip else f"; no flip for {bundle.name} ({_no_flip_reason(bundle)})")
        return Augmentation(True, flip, "flag", why)
    if bundle.test.image_shape[2] == 1:
        return Augmentation(
            False,
            False,
            "data",
            "single-channel images (digits, characters): crops and flips change them; --augment turns the crop on",
        )
    if not flip:
        return Augmentation(True, False, "data", f"{bundle.name}: {_no_flip_reason(bundle)}")
    return Augmentation(True, True, "data", "colour images: the default")


def _no_flip_reason(bundle: DatasetBundle) -> str:
    if bundle.test.image_shape[2] == 1:
        return "single-channel images"
    return "a flip changes the class (digits, signs)"
