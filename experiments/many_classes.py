"""The scan's pre-screen on a 100- or 1,000-class model (issue 21, item 4): time and outcome against the full scan.

No 100- or 1,000-class image dataset is available offline, so the subject is a simple_cnn trained by `bdclean
train` on synthetic classes (a smooth random 32x32 template per class plus noise; 150 training images per
class for 100 classes, 40 for 1,000), with a 3x3 BadNets patch on 5% of the training images, target 37. The
scans run on the same 1,000 training images, fp32, with the scan's seed (default 0):
    python experiments/many_classes.py runs/many-classes [--classes 1000] [--seed S] [screened] [screened-32x16] [full]
screened: the default pre-screen (8 images per class, 64 classes a batch); screened-32x16: the pre-screen of
the sixth session (32 images per class, 16 classes a batch, as the full search); full: every class in full.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

TARGET = 37
PER_CLASS = {100: (150, 20), 1000: (40, 5)}  # training and test images per class


def make_data(root: Path, classes: int) -> None:
    per_train, per_test = PER_CLASS[classes]
    rng = np.random.default_rng(0)
    coarse = rng.uniform(40, 215, (classes, 4, 4, 3))
    templates = (
        torch.nn.functional.interpolate(
            torch.tensor(coarse).permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    root.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", per_train), ("test", per_test)):
        y = np.arange(classes * per) % classes
        x = np.clip(templates[y] + rng.normal(0, 25, (len(y), 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.uint8 if classes <= 256 else np.int64))


SCANS = {
    "screened": {},
    "screened-32x16": {"screen_batch": 32, "screen_group": 16},
    "full": {"screen_above": 10_000},
}


def main(out: str, names: list[str], classes: int = 100, seed: int = 0) -> None:
    root = Path(out)
    data = root / ("data" if classes == 100 else f"data{classes}")
    ckpt = root / f"bd{classes}.safetensors"
    if not ckpt.exists():
        make_data(data, classes)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "backdoor_cli.cli",
                "train",
                "--arch",
                "simple_cnn",
                "--data",
                str(data),
                "--trigger",
                "badnets",
                "--target",
                str(TARGET),
                "--poison-rate",
                "0.05",
                "--epochs",
                "4",
                "--lr",
                "0.05",
                "--device",
                "cpu",
                "--out",
                str(ckpt),
                "--force",
                "--quiet",
                "--json",
            ],
            check=True,
            stdout=(root / f"train{classes}.json").open("w"),
        )
    from backdoor_cli.data.datasets import load_dataset
    from backdoor_cli.models.output_kind import LossAdapter, attach_loss
    from backdoor_cli.scanning.inversion import InversionParams, scan_model
    from backdoor_cli.subject import load_subject, normalization_tensors

    torch.set_num_threads(torch.get_num_threads())
    bundle = load_dataset(str(data))
    subject = load_subject(str(ckpt), bundle)
    mean, std = normalization_tensors(subject, torch.device("cpu"))
    pick = torch.randperm(bundle.train.num_images, generator=torch.Generator().manual_seed(0))[:1000]
    images = bundle.train.subset(pick)
    rows = {}
    for name in names or list(SCANS):
        params = InversionParams(**SCANS[name])
        start = time.perf_counter()
        with attach_loss(subject.model, LossAdapter()) as loss_fn:
            result = scan_model(subject.model, images.x, images.y, classes, mean, std, loss_fn, params, seed=seed)
        seconds = time.perf_counter() - start
        order = sorted(range(classes), key=lambda c: result.triggers[c].l1)
        rows[name] = {
            "seconds": round(seconds, 1),
            "flagged": result.flagged,
            "target_anomaly": round(result.anomaly[TARGET], 2),
            "target_rank_by_mask": order.index(TARGET),
            "candidates": result.candidates,
            "target_screened_in": TARGET in result.candidates,
            "planned_group_steps": params.planned_steps(classes),
        }
        print(name, json.dumps(rows[name]), flush=True)
    for slower in ("full", "screened-32x16"):
        if slower in rows and "screened" in rows:
            rows[f"speedup_over_{slower}"] = round(rows[slower]["seconds"] / rows["screened"]["seconds"], 2)
    (root / f"result{classes}-seed{seed}.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    args = sys.argv[2:]
    options = {"--classes": 100, "--seed": 0}
    for flag in options:
        if flag in args:
            at = args.index(flag)
            options[flag] = int(args[at + 1])
            del args[at : at + 2]
    main(sys.argv[1], args, options["--classes"], options["--seed"])
