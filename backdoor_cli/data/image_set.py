"""ImageSet: uint8 images and their labels, resident on one device, and the checks raw arrays pass to become one.

The dataset loaders (datasets.py) and the streamed image folders (streaming.py) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, H, W, C) and int64 labels (N,), on one device."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))

    def subset(self, indices: torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)])


def images_from_arrays(x: np.ndarray, y: np.ndarray, what: str) -> ImageSet:
    """Validate raw arrays and wrap them: uint8 NHW(C) images, integer labels >= 0, equal lengths."""
    if x.dtype != np.uint8:
        raise InputError(
            f"{what}: images must be uint8 (0..255), got {x.dtype}",
            hint="convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]",
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise InputError(f"{what}: images must be (N, H, W) or (N, H, W, C) with C 1 or 3, got shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{what}: labels 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise InputError(f"{what}: x has {len(x)} images but y has {len(y)} labels (lengths differ)")
    if len(x) == 0:
        raise InputError(f"{what}: the split holds no images")
    if int(y.min()) < 0:
        raise InputError(f"{what}: negative label {int(y.min())}")
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise InputError(f"{what}: images of {x.shape[1]}x{x.shape[2]} pixels are too small")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
