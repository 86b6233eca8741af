"""Tiny synthetic datasets and models for fast CLI and pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_npz_dataset(root: Path, classes: int = 3, size: int = 12, channels: int = 3, n_train: int = 240,
                     n_test: int = 90, seed: int = 0) -> Path:
    """A learnable toy dataset: each class has its own brightness band plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        base = (40 + 170 * y / max(classes - 1, 1)).reshape(-1, 1, 1, 1)
        x = np.clip(base + rng.normal(0, 25, (n, size, size, channels)), 0, 255).astype(np.uint8)
        if channels == 1:
            x = x[..., 0]
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.uint8))
    return root
