"""Running a defense's tuning for purify: the progress lines, the held-out curve, and the default's gentler rerun.

`run_defense` tunes `model` in place with the defense's own loop, reporting each epoch (with the held-out
accuracy when a monitor watches); `unlearn_gentler` runs the default's unlearning again at a lower rate
when the first run cost the held-out images too much (selection/gentler.py) and keeps the better of the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..data.datasets import ImageSet
from ..defenses import DefenseParams
from ..defenses.base import DefenseOutcome
from ..models.output_kind import OutputKind
from ..precision import Compute
from ..progress import Reporter, step_callback
from ..scanning.guided import ScanEvidence, proxy_rates
from ..selection.gentler import CANDIDATE_COST, GENTLER_FACTOR, GentlerRun
from ..selection.holdout import HoldoutMonitor
from ..subject import Subject
from ..tuning.loop import steps_per_epoch


def unlearn_gentler(
    tune: Callable[[DefenseParams, HoldoutMonitor], DefenseOutcome],
    model,
    start: dict,
    params: DefenseParams,
    mean,
    std,
    reporter: Reporter,
    monitor: HoldoutMonitor,
    evidence: ScanEvidence,
    first: DefenseOutcome,
) -> tuple[DefenseOutcome, DefenseParams, GentlerRun]:
    """The unlearning again from the input's weights at GENTLER_FACTOR of the rate (`tune(params, monitor)` runs
    it on `model`, as the first run did); the gentler model is kept when it still removes the scan's
    reconstructions and costs the held-out images less (selection/gentler.py). Returns the kept run's outcome
    and params (the report records the rate the kept weights were tuned at)."""
    first_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first_acc = monitor.curve[-1]["holdout_acc"]
    first_proxy = proxy_rates(model, monitor.images, evidence.chosen, mean, std)
    softer = dataclasses.replace(params, sgd=dataclasses.replace(params.sgd, lr=params.sgd.lr * GENTLER_FACTOR))
    reporter.warn(
        f"the unlearning cost the held-out images {monitor.base_acc - first_acc:.1%} ({monitor.base_acc:.1%} -> "
        f"{first_acc:.1%}): running it again from the input at lr {softer.sgd.lr:g}"
    )
    model.load_state_dict(start)
    again = HoldoutMonitor(monitor.images, monitor.base_acc)
    outcome = tune(softer, again)
    run = GentlerRun(
        input_acc=monitor.base_acc,
        first_lr=params.sgd.lr,
        first_acc=first_acc,
        first_proxy=first_proxy,
        lr=softer.sgd.lr,
        acc=again.curve[-1]["holdout_acc"],
        proxy=proxy_rates(model, monitor.images, evidence.chosen, mean, std),
        curve=again.curve,
    )
    if run.kept_gentler:
        reporter.info(run.reason())
        outcome.notes.append(run.reason())
        return outcome, softer, run
    model.load_state_dict(first_state)
    reporter.warn(run.reason())
    first.notes.append(run.reason())
    return first, params, run


def run_defense(
    defense,
    model,
    subject: Subject,
    clean: ImageSet,
    mean,
    std,
    params: DefenseParams,
    device,
    flip: bool,
    reporter: Reporter,
    output_kind: OutputKind,
    monitor: HoldoutMonitor | None = None,
    compute: Compute | None = None,
    triggers=None,
):
    total = (
        params.sgd.epochs * steps_per_epoch(clean.num_images, params.sgd.batch_size) if defense.trains != "none" else 0
    )
    reporter.start_steps(f"{defense.name} tuning", total)
    on_step = step_callback(reporter, "tuning", total)

    def on_epoch(log) -> None:
        held = f", held-out acc {monitor.observe(model, log.epoch, mean, std):.2%}" if monitor is not None else ""
        reporter.epoch(
            f"epoch {log.epoch}/{params.sgd.epochs}: loss {log.loss:.4f}, "
            f"train acc {log.train_acc:.2%}{held}, lr {log.lr:.4g}, {log.seconds:.1f}s"
        )

    try:
        return defense.run(
            model,
            subject.head,
            clean,
            mean,
            std,
            params,
            device,
            flip=flip,
            on_step=on_step,
            on_epoch=on_epoch,
            loss_adapter=output_kind.adapter,
            **(
                {"precision": compute.plan.tune, "memory_format": compute.formats["tune"].format}
                if compute is not None
                else {}
            ),
            **({"triggers": triggers} if defense.needs_triggers else {}),
        )
    finally:
        reporter.finish_steps()


def undo_costly_candidate(model, start: dict, evidence: ScanEvidence, input_acc: float, acc: float) -> str:
    """Restore the input's weights after unlearning a candidate (a class below the flagging threshold) that cost
    the held-out images more than CANDIDATE_COST, and record in `evidence` that nothing was unlearnt.
    Returns the sentence the report and the terminal give."""
    model.load_state_dict(start)
    classes = ", ".join(str(t.target) for t in evidence.chosen)
    note = (
        f"unlearning the candidate class {classes} (below the flagging threshold) cost the held-out images "
        f"{input_acc - acc:.1%} ({input_acc:.1%} -> {acc:.1%}), more than the {CANDIDATE_COST:.0%} a guess may "
        "cost, so it was undone: the output holds the input model's weights"
    )
    evidence.chosen = []
    evidence.choice += "; " + note
    return note
