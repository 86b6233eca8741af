"""Train the softmax-ended MNIST CNN of issue 21 on CPU and save it as a plain torch state dict.

    .venv/bin/python experiments/softmax_mnist.py --data ../shared/data/mnist --out runs/softmax_mnist.pt

The network is trained the way its authors would (cross-entropy on the logits inside the model);
what bdclean sees is the softmax-ended forward of experiments/softmax_mnist_arch.py, e.g.
`bdclean purify runs/softmax_mnist.pt --arch experiments/softmax_mnist_arch.py:module_softmax ...`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from softmax_mnist_arch import DigitCNN  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def load(path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,1,28,28) float normalised images and int64 labels, the first `limit` of them."""
    with np.load(path) as z:
        x, y = z["x"][:limit], z["y"][:limit]
    images = torch.from_numpy(x).float().div(255).sub(MEAN).div(STD).unsqueeze(1)
    return images, torch.from_numpy(y).long()


def train(model, x, y, epochs: int, lr: float, seed: int, loss_on: str = "logits") -> None:
    """Adam, batch 64. `loss_on` 'logits': cross-entropy on the logits; 'probs': cross-entropy on the
    softmax's output (nn.Softmax then nn.CrossEntropyLoss, a common mistake in published code, which
    drives the logits far apart: the probabilities saturate to exact 0s and 1s)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            logits = model(x[idx])
            loss = F.cross_entropy(logits if loss_on == "logits" else logits.softmax(1), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}, {time.perf_counter() - start:.1f}s")


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000)) / len(
        x
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--out", default="runs/softmax_mnist.pt")
    parser.add_argument("--train-limit", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-on", choices=("logits", "probs"), default="logits")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x, y = load(Path(args.data) / "train.npz", args.train_limit)
    model = DigitCNN()
    train(model, x, y, args.epochs, args.lr, args.seed, args.loss_on)
    tx, ty = load(Path(args.data) / "test.npz", None)
    print(f"clean test accuracy: {accuracy(model.eval(), tx, ty):.2%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
