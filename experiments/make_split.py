"""The defender/evaluation split used by experiments/recipe_grid.sh (issue 12).

Every strong subject starts from a published model trained on all 50,000 CIFAR-10 training images,
so no training image is fresh to it: held-out accuracy measured on them is memorised (about 100%).
A defender's data is fresh, so the experiments draw it from the test split instead: 1,000
class-balanced test images (seeded) are the defender's clean data, and the other 9,000 are the
evaluation split. No decision ever reads the 9,000.

    .venv/bin/python experiments/make_split.py ../shared/data/cifar10 runs/split
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEED, PER_CLASS = 12, 100


def main(data: str, out: str) -> None:
    out_dir = Path(out)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    with np.load(Path(data) / "test.npz", allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    rng = np.random.default_rng(SEED)
    pool = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:PER_CLASS] for c in range(10)]))
    rest = np.setdiff1d(np.arange(len(y)), pool)
    np.savez(out_dir / "defender.npz", x=x[pool], y=y[pool])
    np.savez(out_dir / "eval" / "test.npz", x=x[rest], y=y[rest])
    train = out_dir / "eval" / "train.npz"  # the loader wants one; purify with --clean-data never reads it
    if not train.exists():
        train.symlink_to((Path(data) / "train.npz").resolve())
    print(f"{out_dir}: defender {len(pool)} images, evaluation {len(rest)} images")


if __name__ == "__main__":
    main(*sys.argv[1:3])
