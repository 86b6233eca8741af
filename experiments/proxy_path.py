"""Proxy ASR of the scan's reconstructed trigger along the straight line from an input model to its
purified copy (issue 21: can the point on that line be chosen by the reconstruction, trigger-free?).

    python experiments/proxy_path.py INPUT PURIFIED_DIR CLASS [--arch resnet20 --imagenet-norm]

Reconstructs CLASS's trigger on the first 80% of the purify run's clean images (clean_indices.txt) with
the scan's own inversion and measures its proxy ASR on the other 20% at t = 0, 0.1, ..., 1. The test
split is not read; pair the output with `bdclean compare INPUT PURIFIED --path 11` for the true figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from backdoor_cli.data.datasets import load_dataset
from backdoor_cli.models.output_kind import LossAdapter, attach_loss
from backdoor_cli.scanning.inversion import InversionParams, count_hits, invert_classes
from backdoor_cli.selection.linear_path import interpolate_states
from backdoor_cli.subject import load_subject, normalization_tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("purified_dir")
    ap.add_argument("target", type=int)
    ap.add_argument("--arch")
    ap.add_argument("--imagenet-norm", action="store_true")
    ap.add_argument("--data", default="../shared/data/cifar10")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    bundle = load_dataset(args.data)
    norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) if args.imagenet_norm else {}
    subject = load_subject(args.input, bundle, arch=args.arch, **norm)
    model = subject.model.eval()
    mean, std = normalization_tensors(subject, torch.device("cpu"))
    idx = torch.tensor([int(v) for v in Path(args.purified_dir, "clean_indices.txt").read_text().split()])
    cut = int(0.8 * len(idx))
    x, y = bundle.train.x[idx], bundle.train.y[idx]
    for p in model.parameters():
        p.requires_grad_(False)
    with attach_loss(model, LossAdapter("logits")) as loss_fn:
        trig = invert_classes(
            model,
            x[:cut],
            y[:cut],
            [args.target],
            mean,
            std,
            loss_fn,
            InversionParams(),
            torch.Generator().manual_seed(0),
        )[0]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    from safetensors.torch import load_file

    end = load_file(str(Path(args.purified_dir, "purified.safetensors")))
    end = {k: end.get(k, v) for k, v in start.items()}
    held = x[cut:][y[cut:] != args.target]
    rows = []
    for i in range(11):
        t = i / 10
        model.load_state_dict(interpolate_states(start, end, t))
        model.eval()
        with torch.no_grad():
            hits = count_hits(
                model,
                held,
                args.target,
                trig.mask[None, None],
                trig.pattern.permute(2, 0, 1)[None],
                mean,
                std,
                256,
                channels_last=True,
            )
        rows.append({"t": t, "proxy_asr": hits / held.shape[0]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"mask_l1": trig.l1, "rows": rows}))


if __name__ == "__main__":
    main()
