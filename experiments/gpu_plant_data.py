"""Make .gpu/plant for experiments/gpu_plant.sh: 16,000 CIFAR-10 training images (a seeded draw, indices
kept so a defender's clean images can be taken from them: the memorised protocol) and 2,000 test images
for the planting run's own check, plus the two shared clean ResNets. About 54 MB, under one transfer."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
OUT = Path(".gpu/plant")
OUT.mkdir(parents=True, exist_ok=True)
train, test = np.load(SHARED / "cifar10/train.npz"), np.load(SHARED / "cifar10/test.npz")
idx = np.sort(np.random.default_rng(2026).permutation(len(train["y"]))[:16000])
np.savez_compressed(OUT / "train.npz", x=train["x"][idx], y=train["y"][idx])
np.save(OUT / "train_indices.npy", idx)
np.savez_compressed(OUT / "test.npz", x=test["x"][:2000], y=test["y"][:2000])
for checkpoint in (SHARED / "checkpoints").glob("resnet*.th"):
    shutil.copy(checkpoint, OUT / checkpoint.name)
