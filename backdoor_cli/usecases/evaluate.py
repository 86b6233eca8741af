"""`bdclean evaluate CKPT`: C-Acc (and ASR / RA when there is a trigger) of one checkpoint, gates, cache."""

from __future__ import annotations

from ..config import EvaluateOptions, to_yaml_dict
from ..evaluation.cache import measured
from ..evaluation.gates import check_gates
from ..evaluation.measure import build_eval_sets, evaluate_model
from ..precision import Compute, resolve_precision
from ..progress import Reporter
from ..reports.report import EvaluateReport
from ..runtime import Stopwatch, environment, prepare_model, resolve_device, seed_everything
from ..subject import normalization_tensors
from .references import check_reference_use
from .retuning import retune_checked, retune_clean_set
from .setup import (
    cache_key,
    check_gate_inputs,
    choose_eval_format,
    describe_data,
    describe_trigger,
    eval_images,
    load_run_data,
    open_subject,
    probed_adapter,
    resolve_trigger,
)


def evaluate_checkpoint(opts: EvaluateOptions, reporter: Reporter | None = None, cache=None) -> EvaluateReport:
    """Measure C-Acc (and ASR/RA when there is a trigger) of one checkpoint; with an EvalCache (evaluation/cache.py),
    an evaluation of the same bytes on the same images is read back instead of run again."""
    reporter = reporter or Reporter()
    device = resolve_device(opts.device)
    plan = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    timer = Stopwatch(device)
    with timer.stage("load"):
        reporter.stage(f"loading data {opts.data}")
        bundle, image_size = load_run_data(opts, [opts.checkpoint], need_train=opts.retune_check)
        subject = open_subject(opts, opts.checkpoint, bundle, reporter)
        trigger = resolve_trigger(opts.trigger, opts.target, subject, bundle.test.image_shape, subject.num_classes)
        check_reference_use(opts)
        check_gate_inputs(opts, trigger)
        model = prepare_model(subject.model, device)
        mean, std = normalization_tensors(subject, device)
        sets = build_eval_sets(bundle.test, trigger, device, opts.eval_limit, opts.seed)
    with timer.stage("choose_format"):
        compute = Compute(
            device,
            plan,
            {
                "evaluate": choose_eval_format(
                    opts, model, bundle.test.image_shape, device, plan, reporter, eval_images(sets)
                )
            },
        )
    with timer.stage("evaluate"):
        reporter.stage(
            f"evaluating on {sets.clean.num_images} clean"
            + (f" + {sets.num_poisoned} triggered images" if sets.has_trigger else " images")
            + (" (streamed from disk)" if sets.streamed else "")
        )
        result, _ = measured(
            cache,
            cache_key(cache, subject, bundle, trigger, opts, device, plan.evaluate),
            lambda: evaluate_model(
                model,
                sets,
                mean,
                std,
                device,
                opts.batch_size,
                reporter,
                plan.evaluate,
                compute.formats["evaluate"].format,
            ),
        )
    retune = None
    if opts.retune_check:
        with timer.stage("retune_check"):
            clean = retune_clean_set(opts, bundle, subject)
            retune = retune_checked(
                opts,
                bundle,
                model,
                clean,
                trigger,
                sets,
                mean,
                std,
                device,
                result.asr,
                probed_adapter(model, clean, mean, std, device, reporter),
                reporter,
                plan,
            )
    gates = check_gates(
        result.asr.value if result.asr else None, result.clean_acc.value, max_asr=opts.max_asr, min_acc=opts.min_acc
    )
    return EvaluateReport(
        subject=subject.describe(),
        data=describe_data(bundle, sets, image_size),
        trigger=describe_trigger(trigger),
        result=result,
        gates=gates,
        timings=dict(timer.stages),
        environment=environment(device, compute),
        options=to_yaml_dict(opts),
        retune=retune.to_dict() if retune is not None else None,
    )
