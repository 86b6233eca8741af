"""The default's unlearning and what it may undo (selection/gentler.py has the rules and their measurements).

`unlearn_default` runs the scan-guided unlearning at the default's rate, stopping it after the first epoch for
a gentler rate when that epoch cost the held-out images too much, and running it again gentler when the whole
run did (`unlearn_gentler`), keeping the better of the two; `unlearn_unless_dormant` checks a run that held the
early layers for a dormant backdoor with the scan's own reconstruction (verdicts/dormancy.py) and unlearns again
with fewer layers held when it comes back; `unlearn_cheap_co_flags` runs all that again without the scan's
co-flags when unlearning them was costly (selection/co_flags.py); `undo_costly_candidate` writes the input back
when a class unlearnt without a flag cost the held-out images more than a guess may.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..defenses import DefenseParams
from ..defenses.base import DefenseOutcome
from ..defenses.unlearn import FROZEN_DEPTH
from ..progress import Reporter
from ..scanning.guided import ScanEvidence, proxy_rates
from ..selection.co_flags import CoFlagTrial, worth_trying_without
from ..selection.gentler import CANDIDATE_COST, GENTLER_FACTOR, GentlerRun, needs_gentler, too_hot
from ..selection.holdout import HoldoutMonitor
from ..verdicts.dormancy import DormancyCheck, DormancyRecord, DormancyRerun
from .defense_run import FirstEpochTooCostly

Tune = Callable[..., DefenseOutcome]  # tune(params, monitor, stop_first_epoch=None): one run on purify's model
CheckDormancy = Callable[[], list[DormancyCheck]]  # the dormancy check on purify's model as it is now
LayersHeld = Callable[[float], int]  # how many weight layers an unlearning at a frozen depth holds on purify's model

# After a dormant held-layer output: a third of the weight layers held (half the default's FROZEN_DEPTH), then none.
# On the VGG-16-BN whose two-thirds output was dormant, a third was not, and cost 2.00 points with fresh images
# where every layer cost 3.23 (docs/purification.md, sixteenth session).
RERUN_DEPTHS = (FROZEN_DEPTH / 2, 0.0)
# A rerun trains more layers than the dormant run before it on the same few hundred images, and at the first run's
# rate it forgot more: the second VGG-16-BN lost 3.86 and 3.10 points. So a rerun starts at a third of the rate
# (GENTLER_FACTOR) and distils the input's outputs on the images it does not stamp (weight 1, fst-kd's): on six
# saved inputs of both VGGs a third held cost -0.14 to 0.90 points this way, where plain reruns cost 1.30-5.66, and
# whole runs on four cells 0.18-0.80 (docs/purification.md, twentieth session). The gentler-rate rules still watch
# it (a first epoch that costs too much goes gentler again).
RERUN_RATE = GENTLER_FACTOR
RERUN_DISTILL = 1.0


@dataclass(frozen=True)
class UnlearningSetup:
    """What every run of the default's unlearning shares: `tune` runs it on `model` (whose input weights are
    `start`), `monitor` watches the held-out images, and `evidence` holds the scan's reconstructions."""

    tune: Tune
    model: object
    start: dict
    mean: object
    std: object
    reporter: Reporter
    monitor: HoldoutMonitor
    evidence: ScanEvidence
    layers_held: LayersHeld | None = None  # how many layers a frozen depth holds (None: only the runs tell)

    def proxy(self):
        """The reconstructions' proxy ASR on the held-out images, for the model as it is now."""
        return proxy_rates(self.model, self.monitor.images, self.evidence.chosen, self.mean, self.std)


def unlearn_default(
    setup: UnlearningSetup, params: DefenseParams
) -> tuple[DefenseOutcome, DefenseParams, GentlerRun | None]:
    """The default's unlearning at its own rate, watched by `setup.monitor`: stopped after the first epoch for a
    gentler run when that epoch cost the held-out images more than FIRST_EPOCH_DROP, run again gentler when the
    whole run cost more than GENTLER_DROP (selection/gentler.py). Returns the kept run's outcome and params, and
    the record of the gentler run when there was one."""
    monitor = setup.monitor
    probe = (lambda acc: too_hot(monitor.base_acc, acc)) if params.sgd.epochs > 1 else None
    try:
        first = setup.tune(params, monitor, stop_first_epoch=probe)
    except FirstEpochTooCostly as stop:
        return _restart_gentler(setup, params, stop.acc)
    if monitor.curve and needs_gentler(monitor.base_acc, monitor.curve[-1]["holdout_acc"]):
        return unlearn_gentler(setup, params, first)
    return first, params, None


def rerun_depths(held: int, layers_held: LayersHeld | None) -> list[float]:
    """The RERUN_DEPTHS to try after an output that held `held` weight layers was dormant, in order: each must hold
    fewer layers than the run before it (a network whose six-layer floor holds as many at a third as at two thirds
    goes straight to every layer). `layers_held` says how many a depth holds; without it, each is taken to hold
    fewer."""
    depths, last = [], held
    for depth in RERUN_DEPTHS:
        count = layers_held(depth) if layers_held is not None else (0 if depth <= 0 else last - 1)
        if count < last:
            depths.append(depth)
            last = count
    return depths


def unlearn_unless_dormant(
    setup: UnlearningSetup,
    params: DefenseParams,
    check: CheckDormancy,
    may_rerun: bool,
    rerun_distill: float | None = RERUN_DISTILL,
) -> tuple[DefenseOutcome, DefenseParams, GentlerRun | None, DormancyRecord | None]:
    """`unlearn_default`; when that run held early layers, the trigger-free dormancy check on its output
    (verdicts/dormancy.py: a copy retuned with the scan's reconstruction made opaque). When it comes back and
    `may_rerun` (the user did not choose --frozen-depth), the unlearning again from the input's weights with fewer
    layers held (RERUN_DEPTHS: a third of them, then none), each run checked the same way, until one does not come
    back or every layer was trained; the last run is kept. Holding two thirds of a VGG-16-BN's layers left its
    backdoor dormant, and holding a third or none removed it (docs/purification.md). Returns the kept run's
    outcome, params and gentler record, and the checks (None when no layer was held, so there was nothing to
    check). Each rerun starts at RERUN_RATE of the params' rate and distils the input's clean outputs at
    `rerun_distill` (None: the params' own, which the user set with --distill)."""
    outcome, kept, gentler = unlearn_default(setup, params)
    if outcome.held is None:
        return outcome, kept, gentler, None
    reporter = setup.reporter
    record = _check_held(outcome, check, reporter)
    if not record.dormant or not may_rerun:
        _note_without_rerun(record, outcome, reporter, "--frozen-depth" if record.dormant else None)
        return outcome, kept, gentler, record
    first_dormant = _classes(record.dormant)
    distill = params.own.distill if rerun_distill is None else rerun_distill
    sgd = dataclasses.replace(params.sgd, lr=params.sgd.lr * RERUN_RATE)
    for depth in rerun_depths(record.held_layers, setup.layers_held):
        reporter.warn(
            f"{_where(record)}, and the backdoor of class {_classes(record.dormant)} is dormant there (retuning "
            f"brings its reconstruction, made opaque, back): unlearning again from the input {_holding(setup, depth)}"
            f" at lr {sgd.lr:g}" + _distilling(distill)
        )
        setup.model.load_state_dict(setup.start)
        setup.monitor.curve.clear()
        own = dataclasses.replace(params.own, frozen_depth=depth, distill=distill)
        outcome, kept, gentler = unlearn_default(setup, dataclasses.replace(params, own=own, sgd=sgd))
        held = outcome.held.held if outcome.held is not None else 0
        rerun = DormancyRerun(depth, held, check(), lr=kept.sgd.lr, distill=distill)
        record.reruns.append(rerun)
        record.kept = rerun.kept_as
        for line in rerun.checks:
            reporter.info(f"dormancy check, {_layers(rerun.held_layers)}: {line.describe()}")
        if not rerun.dormant or rerun.held_layers == 0:
            break
    record.note = (
        f"{_held_words(record)}, but the backdoor of class {first_dormant} was dormant there (retuning with "
        f"{record.poisoned} images stamped with its reconstruction, made opaque, brought it back), so the unlearning "
        f"was run again from the input {_rerun_story(record)}, and the last run is the output"
        + (
            f"; it is still dormant there for class {_classes(record.dormant)}"
            if record.dormant
            else "; retuning does not bring it back there"
        )
    )
    outcome.notes.append(record.note)
    return outcome, kept, gentler, record


Unlearnt = tuple[DefenseOutcome, DefenseParams, GentlerRun | None, DormancyRecord | None]


def unlearn_cheap_co_flags(
    setup: UnlearningSetup,
    params: DefenseParams,
    check: CheckDormancy,
    may_rerun: bool,
    rerun_distill: float | None = RERUN_DISTILL,
) -> tuple[Unlearnt, CoFlagTrial | None]:
    """`unlearn_unless_dormant` with every chosen class; when the scan's co-flags are among them
    (ScanEvidence.co_flags) and that run cost the held-out images more than CANDIDATE_COST, all of it again from
    the input without them, kept (and the co-flags left out: `setup.evidence.left`) when that spares the held-out
    images more than CANDIDATE_COST (selection/co_flags.py). Returns the kept run and the trial (None when not
    tried)."""
    evidence, monitor, reporter = setup.evidence, setup.monitor, setup.reporter
    co_flags = evidence.co_flags()
    first = unlearn_unless_dormant(setup, params, check, may_rerun, rerun_distill)
    with_acc = monitor.curve[-1]["holdout_acc"]
    if not co_flags or not worth_trying_without(monitor.base_acc, with_acc):
        return first, None
    reporter.warn(
        f"class {_classes(co_flags)} is a co-flag (far weaker than the strongest flag, spread out), and the "
        f"unlearning with it cost the held-out images {monitor.base_acc - with_acc:.1%}: unlearning again from the "
        "input without it"
    )
    kept_state = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    kept_curve, chosen = list(monitor.curve), list(evidence.chosen)
    co_triggers = [t for t in chosen if t.target in co_flags]
    evidence.chosen = [t for t in chosen if t.target not in co_flags]
    setup.model.load_state_dict(setup.start)
    monitor.curve.clear()
    without = unlearn_unless_dormant(setup, params, check, may_rerun, rerun_distill)
    trial = CoFlagTrial(
        classes=co_flags,
        input_acc=monitor.base_acc,
        with_acc=with_acc,
        without_acc=monitor.curve[-1]["holdout_acc"],
        proxy_without=proxy_rates(setup.model, monitor.images, co_triggers, setup.mean, setup.std),
        with_notes=list(first[0].notes),
    )
    reporter.warn(trial.reason())
    evidence.co_flag_trial = trial.to_dict()
    if trial.left_out:
        evidence.left = list(co_flags)
        evidence.choice += (
            f"; class {_classes(co_flags)} then left out of the unlearning: a co-flag whose unlearning cost more than a "
            "guess may (scan.co_flags)"
        )
        without[0].notes.append(trial.reason())
        return without, trial
    evidence.chosen = chosen
    setup.model.load_state_dict(kept_state)
    monitor.curve[:] = kept_curve
    first[0].notes.append(trial.reason())
    return first, trial


def _classes(classes) -> str:
    return ", ".join(str(c) for c in classes)


def _layers(held: int) -> str:
    return "every layer trained" if held == 0 else f"the first {held} weight layers held"


def _rerun_words(held: int) -> str:
    return "with every layer trained" if held == 0 else f"holding the first {held} weight layers"


def _holding(setup: UnlearningSetup, depth: float) -> str:
    if depth > 0 and setup.layers_held is None:
        return f"holding {depth:.0%} of the weight layers"
    return _rerun_words(setup.layers_held(depth) if depth > 0 else 0)


def _where(record: DormancyRecord) -> str:
    """The run whose check said dormant: the first (held) one or the last rerun."""
    return _held_words(record) if not record.reruns else f"the run with {_layers(record.reruns[-1].held_layers)}"


def _rerun_story(record: DormancyRecord) -> str:
    """'holding the first 4 weight layers (dormant too), then with every layer trained, at lr 0.00333', in the runs'
    order (the rate once when every rerun kept the same, else after each)."""
    rates = {r.lr for r in record.reruns}
    each = len(rates) > 1
    steps = [
        _rerun_words(r.held_layers)
        + (f" at lr {r.lr:g}" if each else "")
        + (" (dormant too)" if r.dormant and r is not record.reruns[-1] else "")
        for r in record.reruns
    ]
    rate = f", at lr {record.reruns[0].lr:g}" if record.reruns and not each else ""
    return ", then ".join(steps) + rate + _distilling(record.reruns[-1].distill if record.reruns else 0.0)


def _distilling(weight: float) -> str:
    if weight <= 0:
        return ""
    return f", distilling the input model's outputs on the images it does not stamp (weight {weight:g})"


def held_layers_checked(outcome: DefenseOutcome, check: CheckDormancy, reporter: Reporter) -> DormancyRecord:
    """The dormancy check on a run that held early layers and cannot be run again (--method unlearn keeps no copy
    of the input): the checks, and a note that says what they showed and what to do."""
    record = _check_held(outcome, check, reporter)
    _note_without_rerun(record, outcome, reporter, "--method unlearn" if record.dormant else None)
    return record


def _check_held(outcome: DefenseOutcome, check: CheckDormancy, reporter: Reporter) -> DormancyRecord:
    reporter.stage("dormancy check: retuning a copy of the output with the scan's reconstruction, made opaque")
    record = DormancyRecord(held_layers=outcome.held.held, held=check())
    for line in record.held:
        reporter.info(f"dormancy check: {line.describe()}")
    return record


def _held_words(record: DormancyRecord) -> str:
    return f"the unlearning held the first {record.held_layers} weight layers at the input's weights"


def _note_without_rerun(record: DormancyRecord, outcome: DefenseOutcome, reporter: Reporter, why: str | None) -> None:
    """The note of a held-layer output that is kept as it is: not revived, or dormant where `why` (the flag that
    kept it from being run again with every layer) says why it was not."""
    if why is None:
        record.note = (
            f"{_held_words(record)}; retuned with {record.poisoned} images stamped with the scan's reconstruction made "
            "opaque, the output did not take that stamp back (the dormancy check: a proxy for the trigger, which can "
            "miss; --retune-check with --trigger measures a known trigger)"
        )
    else:
        record.note = (
            f"{_held_words(record)} ({why}), and the backdoor of class "
            f"{', '.join(str(c) for c in record.dormant)} is dormant: retuning with {record.poisoned} images stamped with its "
            "reconstruction, made opaque, brings it back; --frozen-depth 0 trains every layer"
        )
        reporter.warn(record.note)
    outcome.notes.append(record.note)


def _run_gentler(
    setup: UnlearningSetup, params: DefenseParams, **first
) -> tuple[DefenseOutcome, DefenseParams, HoldoutMonitor, GentlerRun]:
    """The unlearning from the input's weights at GENTLER_FACTOR of the rate, watched on the same held-out
    images: (outcome, its params, its monitor, its record). `first`: what the record says of the first run
    (GentlerRun's first_acc, first_proxy and, after a stop, cause and stopped_acc)."""
    monitor = setup.monitor
    softer = dataclasses.replace(params, sgd=dataclasses.replace(params.sgd, lr=params.sgd.lr * GENTLER_FACTOR))
    setup.model.load_state_dict(setup.start)
    again = HoldoutMonitor(monitor.images, monitor.base_acc)
    outcome = setup.tune(softer, again)
    run = GentlerRun(
        input_acc=monitor.base_acc,
        first_lr=params.sgd.lr,
        lr=softer.sgd.lr,
        acc=again.curve[-1]["holdout_acc"],
        proxy=setup.proxy(),
        curve=again.curve,
        first_curve=list(monitor.curve),
        **first,
    )
    return outcome, softer, again, run


def _keep_gentler(run: GentlerRun, outcome: DefenseOutcome, monitor: HoldoutMonitor, gentler: HoldoutMonitor, reporter):
    """Say so, and make the kept run's curve the report's (its epochs are the tuning history's)."""
    reporter.info(run.reason())
    outcome.notes.append(run.reason())
    monitor.curve[:] = gentler.curve


def _restart_gentler(
    setup: UnlearningSetup, params: DefenseParams, stopped_acc: float
) -> tuple[DefenseOutcome, DefenseParams, GentlerRun]:
    """The run was stopped after its first epoch: the gentler rate from the input's weights, kept when it removes
    the scan's reconstructions at less cost than that epoch; otherwise the default's rate is run in full (what the
    default did before the stop existed) and kept, unless it does not remove them either and the gentler run is
    no worse and cheaper (GentlerRun.neither_removes): then the gentler weights are written back and kept."""
    monitor, reporter = setup.monitor, setup.reporter
    reporter.warn(
        f"the unlearning's first epoch cost the held-out images {monitor.base_acc - stopped_acc:.1%} "
        f"({monitor.base_acc:.1%} -> {stopped_acc:.1%}): stopping it and running from the input at lr "
        f"{params.sgd.lr * GENTLER_FACTOR:g}"
    )
    outcome, softer, again, run = _run_gentler(
        setup, params, first_acc=None, first_proxy=None, cause="first_epoch", stopped_acc=stopped_acc
    )
    if run.kept_gentler:
        _keep_gentler(run, outcome, monitor, again, reporter)
        return outcome, softer, run
    reporter.warn(f"the gentler run is not kept; running the unlearning in full at lr {params.sgd.lr:g}")
    gentler_state = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    setup.model.load_state_dict(setup.start)
    monitor.curve.clear()  # the stopped epoch is computed again, identically, as the full run's first
    first = setup.tune(params, monitor)
    run.first_acc = monitor.curve[-1]["holdout_acc"]
    run.first_proxy = setup.proxy()
    run.first_curve = list(monitor.curve)
    if run.kept_gentler:  # the full run did not remove it either (GentlerRun.neither_removes): the cheaper is kept
        setup.model.load_state_dict(gentler_state)
        _keep_gentler(run, outcome, monitor, again, reporter)
        return outcome, softer, run
    reporter.warn(run.reason())
    first.notes.append(run.reason())
    return first, params, run


def unlearn_gentler(
    setup: UnlearningSetup, params: DefenseParams, first: DefenseOutcome
) -> tuple[DefenseOutcome, DefenseParams, GentlerRun]:
    """The unlearning again from the input's weights at GENTLER_FACTOR of the rate (`setup.tune(params, monitor)`
    runs it on the model, as the first run did); the gentler model is kept when it still removes the scan's
    reconstructions and costs the held-out images less (selection/gentler.py). Returns the kept run's outcome
    and params (the report records the rate the kept weights were tuned at)."""
    monitor, reporter = setup.monitor, setup.reporter
    first_state = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    first_acc = monitor.curve[-1]["holdout_acc"]
    first_proxy = setup.proxy()
    reporter.warn(
        f"the unlearning cost the held-out images {monitor.base_acc - first_acc:.1%} ({monitor.base_acc:.1%} -> "
        f"{first_acc:.1%}): running it again from the input at lr {params.sgd.lr * GENTLER_FACTOR:g}"
    )
    outcome, softer, again, run = _run_gentler(setup, params, first_acc=first_acc, first_proxy=first_proxy)
    if run.kept_gentler:
        _keep_gentler(run, outcome, monitor, again, reporter)
        return outcome, softer, run
    setup.model.load_state_dict(first_state)
    reporter.warn(run.reason())
    first.notes.append(run.reason())
    return first, params, run


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
