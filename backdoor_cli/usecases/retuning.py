"""The retuning check as the use cases run it: the clean images, the reference subject, one retuned copy.

The check itself (a copy retuned with a few poisoned images, and its verdict) is verdicts/retune.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import EvaluateOptions
from ..data.datasets import DatasetBundle, ImageSet, select_clean_subset
from ..data.streaming import materialize
from ..defenses import default_params
from ..errors import ConfigError, InputError
from ..evaluation.measure import EvalSets, evaluate_model
from ..evaluation.metrics import Rate
from ..models.output_kind import LossAdapter
from ..precision import PrecisionPlan
from ..progress import Reporter
from ..runtime import prepare_model
from ..subject import Subject, normalization_tensors
from ..verdicts.retune import PROTOCOL, RetuneResult, RetuneSettings, check_retuning, judge
from .references import open_reference, resolve_reference
from .setup import probed_adapter


def retune_clean_set(opts: EvaluateOptions, bundle: DatasetBundle, subject: Subject) -> ImageSet:
    """evaluate/compare --retune-check: purify's default clean subset (the paper's fraction for the dataset,
    the same seed), so the check on an input model uses the images purify would tune on."""
    if bundle.train is None:
        raise InputError(
            f"{bundle.source} has no training split to draw the retuning check's clean images from",
            hint="purify --retune-check --clean-data DIR runs the check on your own clean images",
        )
    fraction = None if opts.retune_clean_count else default_params(bundle.name)["clean_fraction"]
    indices = select_clean_subset(bundle.train.y, fraction, opts.retune_clean_count, opts.seed, subject.num_classes)
    return materialize(bundle.train.subset(indices))


def retune_settings(opts: EvaluateOptions) -> RetuneSettings:
    """The protocol's SGD settings with the run's --retune-epochs, --retune-lr and --seed."""
    sgd = dataclasses.replace(PROTOCOL, epochs=opts.retune_epochs, lr=opts.retune_lr, seed=opts.seed)
    return RetuneSettings(poisoned=opts.retune_poisoned, sgd=sgd).validate()


@dataclass(frozen=True)
class RetuneRun:
    """What every model of one run's retuning check shares: the clean images, the trigger, the evaluation
    sets, the protocol and the run's precision."""

    clean: ImageSet
    trigger: object
    sets: EvalSets
    settings: RetuneSettings
    device: object
    eval_batch: int
    augment_flip: bool
    plan: PrecisionPlan

    def check(self, model, mean, std, asr: Rate, adapter: LossAdapter) -> RetuneResult:
        """The check on one model whose ASR before retuning is `asr`."""
        return check_retuning(
            model,
            self.clean,
            self.trigger,
            self.sets,
            mean,
            std,
            self.settings,
            self.device,
            asr,
            self.eval_batch,
            self.augment_flip,
            adapter,
            self.plan,
        )


def retune_run(opts: EvaluateOptions, bundle: DatasetBundle, clean: ImageSet, trigger, sets: EvalSets, device, plan):
    """The run's RetuneRun: the protocol with its --retune-* flags, the evaluation batch and the flip rule."""
    eval_batch = getattr(opts, "eval_batch_size", opts.batch_size)
    return RetuneRun(clean, trigger, sets, retune_settings(opts), device, eval_batch, bundle.augment_flip, plan)


def retune_checked(
    opts: EvaluateOptions,
    bundle: DatasetBundle,
    model,
    clean: ImageSet,
    trigger,
    sets: EvalSets,
    mean,
    std,
    device,
    asr: Rate | None,
    adapter: LossAdapter,
    reporter: Reporter,
    plan: PrecisionPlan,
) -> RetuneResult:
    """The retuning check on `model` and, with --clean-reference, on that model with the same images;
    `plan` is the run's precision, resolved once by the use case."""
    if trigger is None or asr is None:
        raise ConfigError("--retune-check needs a trigger", hint="pass --trigger (a built-in name or a spec file)")
    run = retune_run(opts, bundle, clean, trigger, sets, device, plan)
    reporter.stage(
        f"retuning check: a copy tuned {run.settings.sgd.epochs} epochs with {run.settings.poisoned} poisoned images"
    )
    result = run.check(model, mean, std, asr, adapter)
    judge(result, reference_check(opts, bundle, run, reporter, model))
    reporter.info(f"retuning check: {result.verdict}")
    return result


def reference_check(opts, bundle: DatasetBundle, run: RetuneRun, reporter: Reporter, model=None) -> RetuneResult | None:
    """The check on --clean-reference, or None without one (`model`: the checked model, for which `bundled`
    picks a reference of another architecture)."""
    choice = resolve_reference(opts.clean_reference, bundle, bundle.num_classes, model)
    if choice is None:
        return None
    reporter.stage(f"retuning check on the clean reference {choice.label}")
    return retune_one(open_reference(opts, bundle, reporter, choice), None, run, reporter)


def retune_one(subject: Subject, result, run: RetuneRun, reporter: Reporter) -> RetuneResult:
    """The check on one checkpoint's model (its ASR measured here unless `result` has it)."""
    model = prepare_model(subject.model, run.device)
    mean, std = normalization_tensors(subject, run.device)
    if result is None:
        result = evaluate_model(model, run.sets, mean, std, run.device, run.eval_batch, precision=run.plan.evaluate)
    adapter = probed_adapter(model, run.clean, mean, std, run.device, reporter)
    return run.check(model, mean, std, result.asr, adapter)
