"""Write the training images a `bdclean train --holdout-fraction` subject never saw as a clean npz
(`x`, `y`), for `bdclean purify --clean-data`: a defender's clean data that is really fresh.

    .venv/bin/python experiments/holdout_clean_set.py SUBJECT.safetensors ../shared/data/cifar10 clean.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backdoor_cli.checkpoint import read_checkpoint  # noqa: E402


def main(subject: str, data: str, out: str) -> None:
    indices = read_checkpoint(subject).metadata.get("holdout_indices")
    if not indices:
        raise SystemExit(f"{subject} was not trained with --holdout-fraction (no holdout_indices in its metadata)")
    with np.load(Path(data) / "train.npz", allow_pickle=False) as f:
        x, y = f["x"][indices], f["y"][indices]
    np.savez(out, x=x, y=y)
    print(f"{out}: {len(indices)} images, class counts {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
