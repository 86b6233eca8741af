"""`bdclean train`: train a model, optionally backdoored by poisoning, or fine-tune one from a
checkpoint (`--init`), the way a supply-chain attacker would poison a published clean model; save
it as safetensors with full metadata (architecture, normalisation, trigger, poison rate, seed)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..checkpoint import safetensors_bytes
from ..config import TrainOptions
from ..data.datasets import ImageSet, load_dataset, select_clean_subset
from ..data.streaming import materialize
from ..errors import ConfigError, InputError, OutputError
from ..evaluation.measure import EvalResult, build_eval_sets, evaluate_model
from ..evaluation.metrics import at_chance
from ..models import arch_file_source
from ..outputs import OutputSet
from ..precision import (
    Compute,
    PrecisionPlan,
    choose_memory_format,
    eval_timing_batch,
    example_batch,
    resolve_precision,
    torch_format,
)
from ..progress import Reporter, step_callback
from ..reports.report import TrainReport
from ..runtime import Stopwatch, environment, prepare_model, resolve_device, seed_everything
from ..triggers import poison_training_set
from ..tuning.loop import TuneSettings, steps_per_epoch, tune
from ..tuning.sgd import SgdSettings
from .setup import base_metadata, describe_trigger, input_paths, replayable_metrics, require_data, resolve_trigger

DEFAULT_ARCH = "simple_cnn"


def train_model(opts: TrainOptions, reporter: Reporter | None = None) -> TrainReport:
    """Train a (possibly backdoored) model and save it as safetensors with full metadata."""
    reporter = reporter or Reporter()
    if not opts.out:
        opts = dataclasses.replace(opts, out=default_model_name(opts))
        reporter.info(f"no --out given: writing {opts.out}")
    if not 0.0 <= opts.poison_rate <= 1.0:
        raise ConfigError(f"--poison-rate must be in [0, 1], got {opts.poison_rate}")
    if opts.poison_rate > 0 and not opts.trigger:
        raise ConfigError("--poison-rate needs --trigger", hint="e.g. --trigger badnets")
    if not 0.0 <= opts.warmup_epochs <= opts.epochs:
        raise ConfigError(
            f"--warmup-epochs must be in [0, --epochs = {opts.epochs}], got {opts.warmup_epochs:g}",
            hint="e.g. --warmup-epochs 1: the rate rises over the first epoch, then follows the cosine schedule",
        )
    if opts.stamp_after_augment and (opts.poison_rate <= 0 or not opts.trigger):
        raise ConfigError(
            "--stamp-after-augment stamps poisoned images, and this run poisons none",
            hint="give --trigger and --poison-rate, or leave --stamp-after-augment out",
        )
    if opts.stamp_after_augment and not opts.augment:
        raise ConfigError(
            "--stamp-after-augment changes nothing without --augment (without augmentation every poisoned image "
            "is stamped once and never moved)",
            hint="add --augment, or leave --stamp-after-augment out",
        )
    if not 0.0 <= opts.holdout_fraction < 1.0:
        raise ConfigError(f"--holdout-fraction must be in [0, 1), got {opts.holdout_fraction}")
    settings = TuneSettings(
        SgdSettings(
            epochs=opts.epochs,
            lr=opts.lr,
            batch_size=opts.batch_size,
            momentum=opts.momentum,
            weight_decay=opts.weight_decay,
            augment=opts.augment,
            seed=opts.seed,
            warmup_epochs=opts.warmup_epochs,
        )
    )
    device = resolve_device(opts.device)
    plan = resolve_precision(opts.precision, device)  # once per run (a bad --precision: exit 2 before any work)
    out = Path(opts.out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory; give a file name such as model.safetensors")
    with OutputSet(out.parent, [out.name], input_paths(opts, opts.init), opts.force) as outputs:
        report = _train_into(opts, settings, device, plan, out, outputs, reporter)
        outputs.commit()
    return report


def stamp_after_augment(trigger, poison_idx: torch.Tensor, count: int, device):
    """after_augment(xb, idx) for the tuning loop: the trigger on the batch's poisoned images, applied to the
    whole batch and kept where poisoned (no data-dependent shape: nothing waits on the device)."""
    poisoned = torch.zeros(count, dtype=torch.bool)
    poisoned[poison_idx] = True
    poisoned = poisoned.to(device)

    def stamp(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.where(poisoned[idx.to(device)][:, None, None, None], trigger.apply(xb), xb)

    return stamp


def default_model_name(opts: TrainOptions) -> str:
    """simple_cnn-cifar10-badnets-p0.05.safetensors: what was trained, on what, with which backdoor."""
    from ..data.datasets import canonical_name

    arch = opts.arch or (Path(opts.init).stem if opts.init else DEFAULT_ARCH)
    arch = arch.replace(":", "_").replace("/", "_").replace(".py", "")
    data = canonical_name(Path(str(opts.data or "data")).name) or "data"
    attack = f"{Path(opts.trigger).stem}-p{opts.poison_rate:g}" if opts.trigger and opts.poison_rate > 0 else "clean"
    return f"{arch}-{data}-{attack}.safetensors"


def _train_into(
    opts: TrainOptions,
    settings: TuneSettings,
    device,
    plan: PrecisionPlan,
    out: Path,
    outputs: OutputSet,
    reporter: Reporter,
) -> TrainReport:
    seed_everything(opts.seed)
    timer = Stopwatch(device)
    with timer.stage("load"):
        reporter.stage(f"loading data {opts.data}")
        bundle = load_dataset(require_data(opts.data), opts.data_dir, need_train=True, image_size=opts.image_size)
        if bundle.train is None:
            raise InputError(f"{bundle.source} has no training split")
        train = bundle.train
        if opts.train_limit is not None and opts.train_limit < train.num_images:
            from ..data.datasets import stratified_limit

            train = train.subset(stratified_limit(train.y, opts.train_limit, opts.seed))
        train = materialize(train)
        holdout = None
        if opts.holdout_fraction > 0:
            holdout = select_clean_subset(train.y, opts.holdout_fraction, None, opts.seed, bundle.num_classes)
            keep = torch.ones(train.num_images, dtype=torch.bool)
            keep[holdout] = False
            train = train.subset(torch.nonzero(keep).flatten())
        trigger = resolve_trigger(opts.trigger, opts.target, None, bundle.test.image_shape, bundle.num_classes)
        poison_idx = torch.empty(0, dtype=torch.long)
        x, y = train.x, train.y
        if trigger is not None and opts.poison_rate > 0:
            x, y, poison_idx = poison_training_set(
                trigger, x, y, opts.poison_rate, opts.seed, stamp=not opts.stamp_after_augment
            )
        start, arch, model, head, mean, std = _starting_model(opts, bundle, reporter)
        model = prepare_model(model, device)
        h, w, c = bundle.test.image_shape
        shape = (1, c, 1, 1)
        mean_t = torch.tensor(mean, device=device).view(shape)
        std_t = torch.tensor(std, device=device).view(shape)
        data = ImageSet(x, y).to(device)
        sets = build_eval_sets(bundle.test, trigger, device, None, opts.seed)
    with timer.stage("choose_format"):
        shape = bundle.test.image_shape
        formats = {
            "evaluate": choose_memory_format(
                model,
                example_batch(shape, eval_timing_batch(shape), device),
                device,
                plan.evaluate,
                train=False,
                spec=opts.memory_format,
            ),
            "tune": choose_memory_format(
                model,
                example_batch(shape, min(settings.sgd.batch_size, data.num_images), device),
                device,
                plan.tune,
                train=True,
                spec=opts.memory_format,
            ),
        }
        compute = Compute(device, plan, formats)
        reporter.info(compute.describe())
    eval_format, train_format = formats["evaluate"].format, formats["tune"].format
    before = None
    if start is not None:  # what the starting model scores, so the report shows what training changed
        with timer.stage("evaluate_init"):
            reporter.stage("evaluating the initial model")
            model.to(memory_format=torch_format(eval_format))
            before = evaluate_model(
                model, sets, mean_t, std_t, device, opts.eval_batch_size, reporter, plan.evaluate, eval_format
            )
    reporter.info(
        f"training {arch} on {data.num_images} images"
        + (f" from {opts.init}" if start else "")
        + (f" ({len(poison_idx)} poisoned, target {trigger.target})" if len(poison_idx) else "")
        + (", the trigger stamped after crop+flip" if opts.stamp_after_augment else "")
    )
    total = settings.sgd.epochs * steps_per_epoch(data.num_images, settings.sgd.batch_size)
    reporter.start_steps("training", total)
    on_step = step_callback(reporter, "training", total)

    try:
        with timer.stage("train"):
            model.to(memory_format=torch_format(train_format))
            history = tune(
                model,
                data,
                mean_t,
                std_t,
                settings,
                device,
                on_step=on_step,
                precision=plan.tune,
                memory_format=train_format,
                after_augment=(
                    stamp_after_augment(trigger, poison_idx, data.num_images, device)
                    if opts.stamp_after_augment
                    else None
                ),
                on_epoch=lambda log: reporter.epoch(
                    f"epoch {log.epoch}/{settings.sgd.epochs}: loss {log.loss:.4f}, train acc {log.train_acc:.2%}, "
                    f"{log.seconds:.1f}s"
                ),
            )
    finally:
        reporter.finish_steps()
    with timer.stage("evaluate"):
        model.to(memory_format=torch_format(eval_format))
        result = evaluate_model(
            model, sets, mean_t, std_t, device, opts.eval_batch_size, reporter, plan.evaluate, eval_format
        )
    warnings = training_warnings(result, history, bundle.num_classes, settings)
    for warning in warnings:
        reporter.warn(warning)
    from .. import __version__

    meta = base_metadata(arch, bundle.num_classes, c, head, mean, std, bundle)
    if arch_file_source(arch):
        meta["arch_source"] = arch_file_source(arch)
    meta.update(
        {
            "tool_version": __version__,
            "trained_by": "bdclean train",
            "trigger": trigger.to_dict() if trigger is not None else None,
            "poison_rate": opts.poison_rate if trigger is not None else 0.0,
            "seed": opts.seed,
            "poisoned_count": int(len(poison_idx)),
            "stamped_after_augment": bool(opts.stamp_after_augment),
            "init": (
                {
                    "path": str(opts.init),
                    "sha256": start.checkpoint.sha256,
                    "test_metrics_before": replayable_metrics(before),
                }
                if start
                else None
            ),
            "holdout_indices": holdout.tolist() if holdout is not None else None,
            "training": {**settings.to_dict(), "compute": compute.replayable()},
            "test_metrics": replayable_metrics(result),
        }
    )
    with timer.stage("write"):
        blob = safetensors_bytes(dict(model.state_dict()), meta)
        outputs.stage(out.name, blob)
        sha = hashlib.sha256(blob).hexdigest()
    return TrainReport(
        out=str(out),
        sha256=sha,
        arch=arch,
        data=bundle.name,
        result=result,
        history=[h.to_dict() for h in history],
        poisoned=int(len(poison_idx)),
        stamped_after_augment=bool(opts.stamp_after_augment),
        trigger=describe_trigger(trigger),
        warnings=warnings,
        timings=dict(timer.stages),
        environment=environment(device, compute),
        init=(
            {"path": str(opts.init), "sha256": start.checkpoint.sha256, "metrics": before}
            if start is not None
            else None
        ),
    )


def training_warnings(result: EvalResult, history: list, num_classes: int, settings: TuneSettings) -> list[str]:
    """What the user must know before using the model: a run that did not learn the task still writes its
    weights (the report and the metadata show the figures), but says so rather than pass for a subject."""
    acc = result.clean_acc
    if not at_chance(acc, num_classes):
        return []
    last = history[-1] if history else None
    sgd = settings.sgd
    return [
        f"the trained model scores {acc.value:.2%} on {acc.n} test images, chance level ({1 / num_classes:.1%}): "
        "training did not learn the task"
        + (f" (last epoch: loss {last.loss:.3f}, train accuracy {last.train_acc:.1%})" if last else "")
        + f"; lower --lr (it was {sgd.lr:g})"
        + ("" if sgd.warmup_epochs else " or add --warmup-epochs 1")
        + ", or train longer"
    ]


def _starting_model(opts: TrainOptions, bundle, reporter: Reporter):
    """(init subject or None, arch, model, head, mean, std): a fresh model, or the --init checkpoint
    loaded strictly with everything resolved as `evaluate` would (flags > its metadata > weights)."""
    from ..models import build_model, find_head
    from ..subject import load_subject, validate_normalization

    h, w, c = bundle.test.image_shape
    if opts.init:
        reporter.stage(f"loading initial weights {opts.init}")
        start = load_subject(str(opts.init), bundle, arch=opts.arch, mean=opts.mean, std=opts.std)
        for note in start.notes:
            reporter.warn(note)
        return start, start.arch, start.model, start.head, start.mean, start.std
    arch = opts.arch or DEFAULT_ARCH
    mean, std = validate_normalization(
        tuple(opts.mean) if opts.mean else bundle.mean, tuple(opts.std) if opts.std else bundle.std, c
    )
    model = build_model(arch, bundle.num_classes, c)
    return None, arch, model, find_head(model, None, input_shape=(c, h, w)), mean, std
