"""CLP's threshold u on a subject: how many channels, held-out accuracy, test C-Acc and ASR (issue 12).

.venv/bin/python experiments/clp_sweep.py SUBJECT runs/split/defender.npz runs/split/eval [--limit 3000]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backdoor_cli.data.datasets import normalize, select_clean_subset  # noqa: E402
from backdoor_cli.defenses.clp import lipschitz_bounds, prune  # noqa: E402
from backdoor_cli.evaluation.measure import (
    evaluate_model,  # noqa: E402
    top1_accuracy,  # noqa: E402
)
from split_setup import load_split_setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("subject")
    ap.add_argument("pool")
    ap.add_argument("data")
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--u", default="inf,8,6,5,4.5,4,3.5,3,2.5,2,1.5")
    args = ap.parse_args()
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
    held = pool.subset(select_clean_subset(pool.y, 0.2, None, 1, bundle.num_classes))
    bounds = lipschitz_bounds(subject.model, normalize(pool.x[:2], mean, std))
    for u in map(float, args.u.split(",")):
        model = copy.deepcopy(subject.model)
        n = prune(model, bounds, u)
        res = evaluate_model(model, sets, mean, std, device, 1024)
        row = {
            "subject": Path(args.subject).stem,
            "u": u,
            "pruned": n,
            "holdout": top1_accuracy(model, held, mean, std),
            "c_acc": res.clean_acc.value,
            "asr": res.asr.value,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
