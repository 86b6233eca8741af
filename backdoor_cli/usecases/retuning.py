"""The retuning check as the use cases run it: the clean images, the reference subject, one retuned copy.

The check itself (a copy retuned with a few poisoned images, and its verdict) is verdicts/retune.py.
"""

from __future__ import annotations

import dataclasses

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
from .setup import open_reference, probed_adapter


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
    settings = retune_settings(opts)
    reporter.stage(
        f"retuning check: a copy tuned {settings.sgd.epochs} epochs with {settings.poisoned} poisoned images"
    )
    result = check_retuning(
        model,
        clean,
        trigger,
        sets,
        mean,
        std,
        settings,
        device,
        asr,
        _eval_batch(opts),
        bundle.augment_flip,
        adapter,
        plan,
    )
    judge(result, reference_check(opts, bundle, clean, trigger, sets, settings, device, reporter, plan))
    reporter.info(f"retuning check: {result.verdict}")
    return result


def _eval_batch(opts) -> int:
    return getattr(opts, "eval_batch_size", opts.batch_size)


def reference_check(opts, bundle, clean, trigger, sets, settings, device, reporter, plan) -> RetuneResult | None:
    if not opts.clean_reference:
        return None
    reporter.stage(f"retuning check on the clean reference {opts.clean_reference}")
    subject = open_reference(opts, bundle, reporter)
    return retune_one(subject, None, clean, bundle, trigger, sets, settings, device, opts, reporter, plan)


def retune_one(subject: Subject, result, clean, bundle, trigger, sets, settings, device, opts, reporter, plan):
    """The check on one checkpoint's model (its ASR measured here unless `result` has it), in the run's
    precision `plan`."""
    model = prepare_model(subject.model, device)
    mean, std = normalization_tensors(subject, device)
    asr = (result or evaluate_model(model, sets, mean, std, device, _eval_batch(opts), precision=plan.evaluate)).asr
    adapter = probed_adapter(model, clean, mean, std, device, reporter)
    return check_retuning(
        model,
        clean,
        trigger,
        sets,
        mean,
        std,
        settings,
        device,
        asr,
        _eval_batch(opts),
        bundle.augment_flip,
        adapter,
        plan,
    )
