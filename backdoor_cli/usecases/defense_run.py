"""Running a defense's tuning for purify: the progress lines and the held-out curve, epoch by epoch.

`run_defense` tunes `model` in place with the defense's own loop, reporting each epoch (with the held-out
accuracy when a monitor watches), and can stop a run after its first epoch (FirstEpochTooCostly) for the
default's rate rules (usecases/default_unlearning.py).
"""

from __future__ import annotations

from collections.abc import Callable

from ..data.datasets import ImageSet
from ..defenses import DefenseParams
from ..models.output_kind import OutputKind
from ..precision import Compute
from ..progress import Reporter, step_callback
from ..selection.holdout import HoldoutMonitor
from ..subject import Subject
from ..tuning.loop import steps_per_epoch


class FirstEpochTooCostly(Exception):
    """Raised from the epoch callback to stop a run whose first epoch cost the held-out images too much
    (control flow inside this module, never shown to the user)."""

    def __init__(self, acc: float):
        super().__init__(f"held-out accuracy {acc:.4f} after the first epoch")
        self.acc = acc


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
    windows=None,
    stop_first_epoch: Callable[[float], bool] | None = None,
):
    """One run of `defense` on `model`. A scan-guided defense gets the reconstructed `triggers` and the local ones
    whose `windows` it searches (defenses/window_search.py). `stop_first_epoch(held-out accuracy)` returning True
    after the first epoch stops the run there (FirstEpochTooCostly); it needs a monitor."""
    total = (
        params.sgd.epochs * steps_per_epoch(clean.num_images, params.sgd.batch_size) if defense.trains != "none" else 0
    )
    reporter.start_steps(f"{defense.name} tuning", total)
    on_step = step_callback(reporter, "tuning", total)

    def on_epoch(log) -> None:
        acc = monitor.observe(model, log.epoch, mean, std) if monitor is not None else None
        held = f", held-out acc {acc:.2%}" if acc is not None else ""
        reporter.epoch(
            f"epoch {log.epoch}/{params.sgd.epochs}: loss {log.loss:.4f}, "
            f"train acc {log.train_acc:.2%}{held}, lr {log.lr:.4g}, {log.seconds:.1f}s"
        )
        if log.epoch == 1 and acc is not None and stop_first_epoch is not None and stop_first_epoch(acc):
            raise FirstEpochTooCostly(acc)

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
            **({"triggers": triggers, "windows": windows or []} if defense.needs_triggers else {}),
        )
    finally:
        reporter.finish_steps()
