"""The default's unlearning with the input model's clean outputs distilled: does it lower the fresh-data cost?

    python experiments/unlearn_clean_kd.py MODE WEIGHT -- <bdclean arguments>
    BD="python experiments/unlearn_clean_kd.py only 1 --" bash experiments/default_grid.sh OUT NAME CKPT

On the images of a tuning batch that carry no stamp, the loss becomes (the stamped ones keep cross-entropy with
their true labels, which is what unlearns):
  only: w * T^2 * KL(input model || tuned model) in place of the cross-entropy;
  add:  cross-entropy + w * T^2 * KL(...).
T is 2 (ft-kd's). The teacher is a frozen copy of the model as the unlearning starts (the input's weights).
Distilling on the stamped images is not done: it would teach the backdoor back (issue 21's prototype).

An experiment's instrument, not an option of the package: it wraps `defenses.unlearn`'s stamp (to learn which
rows of each batch were stamped, as the rows it changed) and its call of the tuning loop (to pass the objective).
Measured in docs/purification.md (twelfth session): not adopted.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from backdoor_cli.cli import main as bdclean
from backdoor_cli.defenses import unlearn

TEMPERATURE = 2.0


def distilling_objective(model: torch.nn.Module, mode: str, weight: float, stamped: dict):
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def objective(loss, inputs, labels, logits):
        rows = stamped["rows"]
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        with torch.no_grad():
            target = F.log_softmax(teacher(inputs).float() / TEMPERATURE, dim=1)
        student = F.log_softmax(logits.float() / TEMPERATURE, dim=1)
        kd = (target.exp() * (target - student)).sum(1) * TEMPERATURE**2
        per_image = ce + weight * kd * (~rows) if mode == "add" else torch.where(rows, ce, weight * kd)
        return per_image.mean()

    return objective


def install(mode: str, weight: float) -> None:
    stamped: dict = {}
    stamp_factory, tuning = unlearn.trigger_stamp, unlearn.run_tuning

    def recording_stamp(*args, **kwargs):
        stamp = stamp_factory(*args, **kwargs)

        def stamp_and_record(inputs, generator):
            out = stamp(inputs, generator)
            stamped["rows"] = (out != inputs).flatten(1).any(1)
            return out

        return stamp_and_record

    def distilling_tuning(defense, model, *args, **kwargs):
        kwargs["objective"] = distilling_objective(model, mode, weight, stamped)
        outcome = tuning(defense, model, *args, **kwargs)
        outcome.notes.append(f"EXPERIMENT unlearn_clean_kd: {mode}, weight {weight:g}, T {TEMPERATURE:g}")
        return outcome

    unlearn.trigger_stamp = recording_stamp
    unlearn.run_tuning = distilling_tuning


if __name__ == "__main__":
    split = sys.argv.index("--")
    mode, weight = sys.argv[1], float(sys.argv[2])
    if mode not in ("only", "add"):
        raise SystemExit("MODE must be only or add")
    install(mode, weight)
    sys.argv = ["bdclean", *sys.argv[split + 1 :]]
    bdclean()
