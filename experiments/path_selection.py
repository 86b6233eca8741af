"""Does clean accuracy on fresh held-out images pick a good point on the line from a subject to its
purified copy? (issue 12: trigger-free control of the accuracy cost)

For each purified copy, every point t of the straight line (t = 0: the subject, t = 1: the copy) is
scored three ways:
- held-out clean accuracy on the defender's fresh images (all of them, and the first `--holdout`
  of them, the size a real held-out part would have): what a trigger-free rule may look at;
- C-Acc and ASR on the evaluation split (disjoint from the defender's images), with the subject's
  recorded trigger: for the table only, never for the choice.

    .venv/bin/python experiments/path_selection.py --subject runs/subjects/r20-blended-0.01.safetensors \
        --purified runs/robust/pam-h/purified.safetensors --pool runs/split/defender.npz \
        --data runs/split/eval --out runs/path-selection.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backdoor_cli.data.datasets import ImageSet, normalize, select_clean_subset  # noqa: E402
from backdoor_cli.evaluation.measure import (
    evaluate_model,  # noqa: E402
    top1_accuracy,  # noqa: E402
)
from backdoor_cli.selection.linear_path import interpolate_states, path_points  # noqa: E402
from backdoor_cli.subject import load_subject  # noqa: E402
from split_setup import load_split_setup  # noqa: E402


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module, images: ImageSet, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 256
) -> int:
    """Re-estimate every BatchNorm's running mean and variance on `images` (labels unused), as an
    exact average over them (momentum None), with the weights as they are. An interpolated model's
    statistics are interpolated too, and need not match what its weights produce. Returns how many
    BatchNorm layers were reset; the model's train/eval modes are restored."""
    norms = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = {m: m.momentum for m in norms}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for i in range(0, images.num_images, batch_size):
            model(normalize(images.x[i : i + batch_size], mean, std))
    finally:
        for m in norms:
            m.momentum = saved[m]
        for module, training in modes.items():
            module.training = training
    return len(norms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subject", required=True)
    ap.add_argument("--purified", nargs="+", required=True)
    ap.add_argument("--pool", required=True, help="npz of the defender's fresh clean images")
    ap.add_argument("--data", required=True, help="dataset dir whose test.npz is the evaluation split")
    ap.add_argument("--holdout", type=int, default=200)
    ap.add_argument("--points", type=int, default=21)
    ap.add_argument("--ts", default=None, help="comma-separated t values instead of --points")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recalibrate", action="store_true", help="re-estimate BatchNorm statistics on the pool at each t")
    args = ap.parse_args()
    torch.manual_seed(0)
    setup = load_split_setup(args.subject, args.pool, args.data, args.limit)
    device, bundle, subject, mean, std, pool, sets = (
        setup.device,
        setup.bundle,
        setup.subject,
        setup.mean,
        setup.std,
        setup.pool,
        setup.sets,
    )
    small = pool.subset(select_clean_subset(pool.y, None, args.holdout, 1, bundle.num_classes))
    start = {k: v.clone() for k, v in subject.model.state_dict().items()}
    with open(args.out, "a") as out:
        for path in args.purified:
            end = load_subject(path, bundle).model.state_dict()
            for t in list(map(float, args.ts.split(","))) if args.ts else path_points(args.points):
                subject.model.load_state_dict(interpolate_states(start, end, t))
                if args.recalibrate:
                    recalibrate_batchnorm(subject.model, pool, mean, std)
                res = evaluate_model(subject.model, sets, mean, std, device, 1024)
                row = {
                    "subject": args.subject,
                    "purified": path,
                    "t": round(t, 4),
                    "recalibrated": args.recalibrate,
                    "holdout_all": top1_accuracy(subject.model, pool, mean, std),
                    "holdout_small": top1_accuracy(subject.model, small, mean, std),
                    "c_acc": res.clean_acc.value,
                    "asr": res.asr.value if res.asr else None,
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(
                    f"{Path(path).parent.name} t={t:.2f} held {row['holdout_all']:.3f}/{row['holdout_small']:.3f} "
                    f"acc {row['c_acc']:.4f} asr {row['asr']:.4f}",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    main()
