#!/usr/bin/env python3
"""How large must checked bf16 evaluation's safety factor be? (evaluation/checked.py, CHECK_SAFETY)

    .venv/bin/python benchmarks/checked_safety.py [--data DIR] [--subject CKPT ...]

--data is the CIFAR-10 directory (default ../shared/data/cifar10 beside the repository); each --subject
adds a bdclean .safetensors (e.g. a patch-trigger ResNet-20 made with `bdclean train --init`; the study in
benchmarks/results/checked-study.md used one). A model whose file is missing is skipped with its path.

For each model it computes the full CIFAR-10 test set's logits in fp32 and in bf16 autocast (channels_last,
batches of 128), the relative error of bf16's logit differences per image, and the error sample the
checked evaluation would take (the first batch and every 16th). For each factor K it counts the bf16
flips an image would keep (margin > K x the sample's worst error x its scale: must be 0), the share of
images run in fp32, and the worst error/margin ratio among the images kept (the headroom left).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backdoor_cli.data.datasets import load_dataset, normalize  # noqa: E402
from backdoor_cli.evaluation.checked import CHECK_EVERY, ERROR_FLOOR  # noqa: E402
from backdoor_cli.precision import autocast  # noqa: E402
from backdoor_cli.runtime import prepare_model  # noqa: E402
from backdoor_cli.subject import load_subject, normalization_tensors  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BATCH = 128
MODELS = (
    (
        "simple_cnn Blended 5% (make bench)",
        REPO / "benchmarks" / ".cache" / "cifar10-simple_cnn-blended-p0.05-e4-n10000-s0.safetensors",
        None,
        None,
    ),
    ("resnet20 (clean, shared)", SHARED / "checkpoints" / "resnet20-12fca82f.th", "resnet20", IMAGENET_NORM),
)


def logits_both(model, x, mean, std, device):
    low, high = [], []
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            batch = normalize(x[i : i + BATCH], mean, std).contiguous(memory_format=torch.channels_last)
            high.append(model(batch).float())
            with autocast(device, "bf16"):
                low.append(model(batch).float())
    return torch.cat(low), torch.cat(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10", help="CIFAR-10 directory (test.npz)")
    parser.add_argument("--subject", type=Path, action="append", default=[], help="a bdclean .safetensors to add")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    bundle = load_dataset(str(args.data), None, need_train=False)
    models = (*MODELS, *((f"{path.stem} (--subject)", path, None, None) for path in args.subject))
    for name, path, arch, norm in models:
        if not path.exists():
            print(f"{name}: skipped, {path} not found")
            continue
        mean_flag, std_flag = norm if norm else (None, None)
        subject = load_subject(str(path), bundle, arch=arch, mean=mean_flag, std=std_flag)
        model = prepare_model(subject.model, device).eval().to(memory_format=torch.channels_last)
        mean, std = normalization_tensors(subject, device)
        low, high = logits_both(model, bundle.test.x, mean, std, device)
        scale = low.abs().amax(1)
        top = low.argmax(1, keepdim=True)
        error = ((low.gather(1, top) - low) - (high.gather(1, top) - high)).abs().amax(1) / scale
        two = low.topk(2, 1).values
        ratio = (two[:, 0] - two[:, 1]) / scale
        flip = low.argmax(1) != high.argmax(1)
        sampled = (torch.arange(len(low)) // BATCH) % CHECK_EVERY == 0
        worst = error[sampled].max().item()
        print(
            f"{name}: {int(flip.sum())} bf16 flips; sample's worst error {worst:.4f}, all images' {error.max().item():.4f}"
        )
        for k in (1, 1.5, 2, 3, 4, 8):
            keep = (ratio > k * max(worst, ERROR_FLOOR)) & ~sampled
            headroom = (error[keep] / ratio[keep]).max().item() if keep.any() else float("nan")
            print(
                f"  K {k}: flips kept {int((flip & keep).sum())}, run in fp32 {1 - keep.float().mean().item():.1%}, "
                f"worst error/margin kept {headroom:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
