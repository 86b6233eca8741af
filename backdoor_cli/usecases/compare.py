"""`bdclean compare` and `bdclean path`: several checkpoints measured on the same images, and the line between two."""

from __future__ import annotations

from pathlib import Path

from ..config import CompareOptions, to_yaml_dict
from ..errors import ConfigError, InputError
from ..evaluation.gates import check_gates
from ..evaluation.measure import build_eval_sets, evaluate_model
from ..evaluation.metrics import defense_effectiveness_rating
from ..evaluation.paired import outcome_changes
from ..outputs import OutputSet
from ..precision import Compute, resolve_precision
from ..progress import Reporter
from ..reports.report import CompareReport, CompareRow, weight_drift
from ..runtime import environment, prepare_model, resolve_device, seed_everything
from ..selection.linear_path import PathReport, path_plot_png, path_points, walk_path
from ..subject import Subject, normalization_tensors
from ..verdicts.retune import RetuneResult, judge
from .references import check_reference_use
from .retuning import reference_check, retune_clean_set, retune_one, retune_run
from .setup import (
    check_gate_inputs,
    choose_eval_format,
    describe_data,
    describe_trigger,
    eval_images,
    input_paths,
    load_run_data,
    open_subject,
    resolve_trigger,
)


def compare_checkpoints(opts: CompareOptions, reporter: Reporter | None = None) -> CompareReport:
    """Evaluate N checkpoints on the same images and trigger; drift and DER against the reference."""
    reporter = reporter or Reporter()
    if opts.checkpoint:  # inherited from the shared options; compare reads `checkpoints`
        raise ConfigError(
            "compare takes `checkpoints` (a list), not `checkpoint`",
            hint="name the checkpoints as arguments, or as a `checkpoints:` list in the config",
        )
    if len(opts.checkpoints) < 2:
        raise ConfigError("compare needs at least two checkpoints")
    device = resolve_device(opts.device)
    plan = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    reporter.stage(f"loading data {opts.data}")
    bundle, image_size = load_run_data(opts, opts.checkpoints, need_train=opts.retune_check)
    reference_path = opts.reference or opts.checkpoints[0]
    # One model in memory besides the reference: a folder of checkpoints compares in flat memory.
    reference = open_subject(opts, reference_path, bundle, reporter)
    trigger = resolve_trigger(opts.trigger, opts.target, reference, bundle.test.image_shape, reference.num_classes)
    check_reference_use(opts)
    check_gate_inputs(opts, trigger)
    sets = build_eval_sets(bundle.test, trigger, device, opts.eval_limit, opts.seed)
    formats = {}

    def measure(path: str, subject: Subject):
        reporter.stage(f"evaluating {path}")
        mean, std = normalization_tensors(subject, device)
        model = prepare_model(subject.model, device)
        choice = choose_eval_format(opts, model, bundle.test.image_shape, device, plan, reporter, eval_images(sets))
        formats[f"evaluate {path}"] = choice
        return evaluate_model(model, sets, mean, std, device, opts.batch_size, reporter, plan.evaluate, choice.format)

    ref = measure(reference_path, reference)
    ref_state = reference.checkpoint.state_dict
    retune = _retune_checker(opts, bundle, reference, trigger, sets, device, reporter, plan)
    rows = []
    for path in opts.checkpoints:
        subject = reference if path == reference_path else open_subject(opts, path, bundle, reporter)
        res = ref if path == reference_path else measure(path, subject)
        drop = ref.clean_acc.value - res.clean_acc.value
        der = (
            defense_effectiveness_rating(ref.clean_acc.value, res.clean_acc.value, ref.asr.value, res.asr.value)
            if ref.asr and res.asr and path != reference_path
            else None
        )
        gates = check_gates(
            res.asr.value if res.asr else None, res.clean_acc.value, drop, opts.max_asr, opts.min_acc, opts.max_acc_drop
        )
        rows.append(
            CompareRow(
                path=path,
                sha256=subject.checkpoint.sha256,
                arch=subject.arch,
                method=(subject.checkpoint.metadata.get("purification") or {}).get("method"),
                result=res,
                acc_drop=drop,
                der=der,
                drift=weight_drift(ref_state, subject.checkpoint.state_dict),
                gates=gates,
                is_reference=path == reference_path,
                retune=retune(subject, res).to_dict() if retune is not None else None,
                paired={} if path == reference_path else outcome_changes(ref.outcomes, res.outcomes) or {},
            )
        )
        del subject  # the next checkpoint's model replaces this one
    return CompareReport(
        rows=rows,
        reference=reference_path,
        data=describe_data(bundle, sets, image_size),
        trigger=describe_trigger(trigger),
        environment=environment(device, Compute(device, plan, formats)),
        options=to_yaml_dict(opts),
    )


def _retune_checker(opts, bundle, first: Subject, trigger, sets, device, reporter, plan):
    """compare --retune-check: a function (subject, its result) -> RetuneResult, or None without the flag.
    The clean reference is retuned once, here; each checkpoint while it is the one in memory."""
    if not opts.retune_check:
        return None
    run = retune_run(opts, bundle, retune_clean_set(opts, bundle, first), trigger, sets, device, plan)
    reference = reference_check(opts, bundle, run, reporter)

    def check(subject: Subject, result) -> RetuneResult:
        reporter.stage(f"retuning check on {subject.checkpoint.path}")
        return judge(retune_one(subject, result, run, reporter), reference)

    return check


def trace_linear_path(opts: CompareOptions, reporter: Reporter | None = None) -> PathReport:
    """compare A B --path N: C-Acc and ASR at N evenly spaced points of the segment from A to B."""
    reporter = reporter or Reporter()
    if len(opts.checkpoints) != 2:
        raise ConfigError(f"--path needs exactly two checkpoints, got {len(opts.checkpoints)}")
    path_points(opts.path)  # checks the count before anything is loaded
    device = resolve_device(opts.device)
    plan = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    reporter.stage(f"loading data {opts.data}")
    bundle, image_size = load_run_data(opts, opts.checkpoints, need_train=False)
    start, end = (open_subject(opts, p, bundle, reporter) for p in opts.checkpoints)
    if (start.mean, start.std) != (end.mean, end.std):
        raise InputError(
            "the two checkpoints normalise their inputs differently, so the models between them have no "
            "one input normalisation",
            hint="pass --mean and --std to use one for both",
        )
    trigger = resolve_trigger(opts.trigger, opts.target, start, bundle.test.image_shape, start.num_classes)
    sets = build_eval_sets(bundle.test, trigger, device, opts.eval_limit, opts.seed)
    mean, std = normalization_tensors(start, device)
    model = prepare_model(start.model, device)
    states = [{k: v.detach().clone() for k, v in s.model.state_dict().items()} for s in (start, end)]
    reporter.start_steps("linear path", opts.path)
    try:
        points = walk_path(
            model,
            states[0],
            states[1],
            opts.path,
            sets,
            mean,
            std,
            device,
            opts.batch_size,
            on_point=reporter.advance,
            precision=plan.evaluate,
        )
    finally:
        reporter.finish_steps()
    outputs = {}
    if opts.path_plot:
        plot = Path(opts.path_plot)
        png = path_plot_png(points, Path(opts.checkpoints[0]).name, Path(opts.checkpoints[1]).name)
        with OutputSet(plot.parent, [plot.name], input_paths(opts, *opts.checkpoints), opts.force) as staged:
            staged.stage(plot.name, png)
            staged.commit()
        outputs["plot"] = str(plot)
    return PathReport(
        start=start.describe(),
        end=end.describe(),
        points=points,
        data=describe_data(bundle, sets, image_size),
        trigger=describe_trigger(trigger),
        # no memory format is chosen for the path: its points run in the model's default (channels_last)
        environment=environment(device, Compute(device, plan, {})),
        options=to_yaml_dict(opts),
        outputs=outputs,
    )
