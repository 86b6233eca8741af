"""Why the recipe killed the softmax-ended MNIST CNN of issue 21: what the teacher says on cropped
digits, and how many hidden units a purified copy has left alive.

    .venv/bin/python experiments/softmax_mnist_diagnose.py runs/softmax_mnist_ceprobs.pt \
        --data ../shared/data/mnist --purified runs/softmax_purify/module_softmax-recipe-augment/purified.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backdoor_cli.checkpoint import read_checkpoint  # noqa: E402
from backdoor_cli.data.datasets import augment_batch, load_dataset, normalize  # noqa: E402
from softmax_mnist_arch import DigitCNN  # noqa: E402

MEAN, STD = torch.tensor([0.1307]), torch.tensor([0.3081])


@torch.no_grad()
def teacher_on(model, x, y) -> str:
    """Accuracy, mean top probability, and how often it is >= 0.99 while wrong."""
    probs = model(normalize(x, MEAN, STD)).softmax(1)
    top, pred = probs.max(1)
    wrong = pred != y
    return (
        f"acc {float((~wrong).float().mean()):.1%}, mean top prob {float(top.mean()):.3f}, "
        f"confidently wrong (p >= 0.99) {float((wrong & (top >= 0.99)).float().mean()):.1%}"
    )


@torch.no_grad()
def alive_units(model, x) -> str:
    """Hidden units of fc1 that fire on at least one of the images."""
    feats = model.features(normalize(x, MEAN, STD))
    return f"{int((feats > 0).any(0).sum())} of {feats.shape[1]} fc1 units fire on some image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--purified", nargs="*", default=[])
    args = parser.parse_args()
    bundle = load_dataset(args.data)
    x, y = bundle.train.x[:1200], bundle.train.y[:1200]
    model = DigitCNN().eval()
    model.load_state_dict(torch.load(args.model))
    cropped = augment_batch(x, torch.Generator().manual_seed(0), flip=False)
    print(f"input model, plain images:   {teacher_on(model, x, y)}")
    print(f"input model, cropped images: {teacher_on(model, cropped, y)}")
    print(f"input model: {alive_units(model, x)}")
    for path in args.purified:
        purified = DigitCNN().eval()
        purified.load_state_dict(read_checkpoint(path).state_dict)
        print(f"{path}: {alive_units(purified, x)}")


if __name__ == "__main__":
    main()
