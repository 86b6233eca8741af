"""LP-then-FST (issue 12): fit the re-initialised head on frozen features first (with FST's penalty and
norm constraint), then run the joint FST phase from that head, with or without distillation.
Kumar et al. (ICLR 2022) found that tuning all layers under a random head distorts the features; the
question is whether FST's cost falls and its removal stays. Scored like the grid: the defender's
fresh images (800 tune / 200 held out), 3,000 evaluation images, the trigger for the table only.

    .venv/bin/python experiments/lp_fst.py SUBJECT runs/split/defender.npz runs/split/eval --kd 1 --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backdoor_cli.defenses import DefenseParams  # noqa: E402
from backdoor_cli.defenses.base import Defense, get_head  # noqa: E402
from backdoor_cli.defenses.distill import distillation_term, frozen_copy  # noqa: E402
from backdoor_cli.defenses.finetune import reinitialise_head, run_tuning  # noqa: E402
from backdoor_cli.defenses.fst import feature_shift_penalty, project_to_norm  # noqa: E402
from backdoor_cli.evaluation.measure import (
    evaluate_model,  # noqa: E402
    top1_accuracy,  # noqa: E402
)
from backdoor_cli.runtime import seed_everything  # noqa: E402
from backdoor_cli.selection.holdout import split_holdout  # noqa: E402
from split_setup import load_split_setup  # noqa: E402

HEAD_ONLY = Defense("lp-phase", "", reinit_head=False, trains="head", uses_alpha=True, run=None)
JOINT = Defense("joint-phase", "", reinit_head=False, trains="all", uses_alpha=True, run=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("subject")
    ap.add_argument("pool")
    ap.add_argument("data")
    ap.add_argument("--kd", type=float, default=0.0)
    ap.add_argument("--lp-epochs", type=int, default=10)
    ap.add_argument("--lp-lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seed_everything(0)
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
    tune_set, held = split_holdout(pool, 0.2, 0, bundle.num_classes)
    model = copy.deepcopy(subject.model)
    teacher = frozen_copy(subject.model)
    head = get_head(model, subject.head)
    original = head.weight.detach().clone()
    norm = original.norm()
    reinitialise_head(head, 0)
    fst = dict(
        penalty=lambda: feature_shift_penalty(head.weight, original, args.alpha),
        after_step=lambda: project_to_norm(head.weight, norm),
    )
    base_held = top1_accuracy(subject.model, held, mean, std)
    rows = []

    def record(phase):
        res = evaluate_model(model, sets, mean, std, device, 1024)
        row = {
            "subject": Path(args.subject).stem,
            "kd": args.kd,
            "lp_epochs": args.lp_epochs,
            "lp_lr": args.lp_lr,
            "phase": phase,
            "held_input": base_held,
            "held": top1_accuracy(model, held, mean, std),
            "c_acc": res.clean_acc.value,
            "asr": res.asr.value,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.lp_epochs:
        lp = DefenseParams.of(lr=args.lp_lr, epochs=args.lp_epochs, seed=0).validate()  # alpha: the `fst` penalty
        run_tuning(HEAD_ONLY, model, subject.head, tune_set, mean, std, lp, device, True, **fst)
        record("after head fit")
    params = DefenseParams.of(lr=0.01, epochs=args.epochs, seed=0).validate()
    extra = {"batch_penalty": distillation_term(teacher, args.kd, 2.0)} if args.kd else {}
    run_tuning(JOINT, model, subject.head, tune_set, mean, std, params, device, True, **fst, **extra)
    record("after joint phase")
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
