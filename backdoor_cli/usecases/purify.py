"""`bdclean purify`: the use case, from the suspect checkpoint to the purified one and its report.

purify_checkpoint(opts)
  read checkpoint -> build + load strictly -> load data (test, clean subset) -> trigger
  -> probe the output kind (logits/probs/log-probs) -> evaluate (before) -> defense.run with the
  matching loss -> evaluate (after) -> write weights + report
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import torch

from ..checkpoint import safetensors_bytes
from ..config import PurifyOptions, to_yaml_dict
from ..data.augmentation import decide_augmentation
from ..data.datasets import DatasetBundle, ImageSet, indices_sha256
from ..defenses import DefenseParams, default_params, get_defense
from ..defenses.base import Defense, DefenseOutcome, inapplicable, method_params
from ..errors import ConfigError
from ..evaluation.cache import measured
from ..evaluation.gates import GateResult, check_gates
from ..evaluation.measure import build_eval_sets, evaluate_model, top1_accuracy
from ..evaluation.metrics import defense_effectiveness_rating
from ..models import hub
from ..models.depth import layers_held_at
from ..models.output_kind import OutputKind, parse_output_kind
from ..outputs import OutputSet
from ..precision import (
    FORMAT_TIMED_STEPS,
    Compute,
    PrecisionPlan,
    choose_memory_format,
    evaluation_format_from_tuning,
    example_batch,
    resolve_precision,
    torch_format,
    working_precision,
)
from ..progress import Reporter
from ..reports.report import PurifyReport, stage_purify_report
from ..runtime import Stopwatch, environment, prepare_model, resolve_device, seed_everything
from ..scanning.cache import ScanCache, keep_scan_hint, open_scan_cache
from ..scanning.guided import (
    CleanReference,
    ScanEvidence,
    candidate_below_threshold,
    check_reference,
    choose_triggers,
    local_rates,
    proxy_rates,
    rescan,
    run_scan,
    set_aside_natural,
    vouch_for_candidate,
)
from ..scanning.inversion import InversionParams
from ..selection.gentler import candidate_too_costly
from ..selection.holdout import HoldoutMonitor, split_holdout
from ..selection.path_select import memorised_warning, select_on_path
from ..selection.recipe import CAVEAT, Recipe, fit_to_clean_data, resolve_recipe
from ..subject import Subject, export_weights, normalization_tensors
from ..tuning.loop import steps_per_epoch
from ..tuning.sgd import SgdSettings
from ..verdicts.dormancy import DormancyRecord, check_dormancy, dormancy_settings
from ..verdicts.removal import combine_verdicts, judge_removal, judge_removal_by_scan, with_co_flags_left
from .default_unlearning import (
    RERUN_DISTILL,
    UnlearningSetup,
    held_layers_checked,
    undo_costly_candidate,
    unlearn_cheap_co_flags,
)
from .defense_run import run_defense
from .references import check_reference_use, open_clean_reference
from .retuning import retune_checked
from .setup import (
    cache_key,
    check_gate_inputs,
    choose_eval_format,
    decide_output_kind,
    describe_data,
    describe_trigger,
    eval_images,
    input_paths,
    load_run_data,
    open_subject,
    replayable_metrics,
    resolve_trigger,
    select_clean_set,
    subject_metadata,
    untimed_format,
)

PURIFY_OUTPUTS = ("purified.safetensors", "report.json", "report.md", "config.yaml", "clean_indices.txt")


# A clean-accuracy loss (in fractions) above which an alpha-based defence suggests a smaller alpha.
# Measured (docs/reproduction.md): on small, weakly trained CIFAR-10 models FST at the paper's alpha
# 0.2 cost 25-41 points, and alpha 0.05 cost 12-15 while ASR stayed at 0-10.5%.
ALPHA_ADVICE_DROP = 0.10


def _defense_params(
    opts: PurifyOptions, dataset: str | None, recipe: Recipe, defense: Defense
) -> tuple[DefenseParams, float | None]:
    defaults = default_params(dataset)
    sgd = SgdSettings(
        lr=opts.lr if opts.lr is not None else defaults["lr"],
        epochs=opts.epochs if opts.epochs is not None else defaults["epochs"],
        batch_size=opts.batch_size,
        momentum=opts.momentum,
        weight_decay=opts.weight_decay,
        augment=opts.augment is not False,  # the data's rule refines it (_purify_into)
        seed=opts.seed,
    )
    # the method's own: the user's values over the recipe's over the method's defaults (the dataset's alpha)
    own = {name: defaults[name] for name in defense.own_params if name in defaults}
    own.update({k: v for k, v in recipe.params().items() if k in defense.own_params})
    own.update({name: getattr(opts, name) for name in defense.own_params if getattr(opts, name) is not None})
    smoothing = opts.label_smoothing if opts.label_smoothing is not None else recipe.params().get("label_smoothing")
    params = DefenseParams(sgd=sgd, label_smoothing=smoothing, own=defense.params_type(**own)).validate()
    fraction = opts.clean_fraction
    if fraction is None and opts.clean_count is None and opts.clean_data is None:
        fraction = defaults["clean_fraction"]
    return params, fraction


def refuse_inapplicable(opts: PurifyOptions, defense) -> None:
    """A method-specific flag (or config key) the chosen method would ignore is an error that names it:
    a run must never record a value it did not use. lr/epochs/label-smoothing mean nothing to a method
    that does not tune (clp)."""
    names = method_params() + (("lr", "epochs", "label_smoothing") if defense.trains == "none" else ())
    problems = inapplicable(
        defense, {name: getattr(opts, name) for name in names}, chosen_by=None if opts.method else "the default method"
    )
    if not defense.needs_triggers:  # the scan runs for scan-guided methods only
        for flag, given in (("--scan-steps", opts.scan_steps is not None), ("--precaution", opts.precaution)):
            if given:
                problems.append(f"{flag} does not apply to --method {defense.name} (it runs no scan; unlearn does)")
    if problems:
        hint = (
            "drop it, or choose a method that reads it"
            if len(problems) == 1
            else "drop them, or choose a method that reads them"
        )
        raise ConfigError("; ".join(problems), hint=hint)


def purify_checkpoint(opts: PurifyOptions, reporter: Reporter | None = None, cache=None) -> PurifyReport:
    """Evaluate, tune with a defense, evaluate again, and write the purified weights and report.
    With an EvalCache, the input's evaluation is read back when `evaluate` already measured it.

    The outputs are published as one set at the end (OutputSet): a failure or Ctrl-C at any point
    leaves --out as it was.
    """
    reporter = reporter or Reporter()
    recipe = resolve_recipe(opts.method, opts.holdout_fraction, opts.select, opts.select_budget, opts.path_floor)
    defense = get_defense(recipe.method)
    refuse_inapplicable(opts, defense)
    if opts.retune_clean_count is not None:  # an evaluate/compare setting; a config key must not pass unused
        raise ConfigError(
            "retune-clean-count does not apply to purify: its retuning check retunes on the clean "
            "images purify tuned on",
            hint="drop it, or use --clean-count / --clean-fraction",
        )
    if recipe.recommended:
        reporter.info(f"note: {CAVEAT}")
    if not opts.out:
        raise ConfigError("--out is required", hint="a directory for purified.safetensors and the report")
    device = resolve_device(opts.device)
    plan = resolve_precision(opts.precision, device)  # once per run (a bad --precision: exit 2 before any work)
    out = Path(opts.out)
    params, fraction = _defense_params(
        opts, None, recipe, defense
    )  # range errors before any work; dataset defaults below
    parse_output_kind(opts.output_kind)  # a bad --output-kind: exit 2 before any work
    names = PURIFY_OUTPUTS + ("report.png",) + hub.OUTPUTS  # the hub layout is written for hub models only
    with OutputSet(out, names, input_paths(opts, opts.checkpoint), opts.force) as outputs:
        report = _purify_into(opts, recipe, defense, device, plan, outputs, reporter, cache)
        reporter.stage(f"writing outputs to {out}")
        outputs.commit()
    return report


def _purify_into(
    opts: PurifyOptions,
    recipe: Recipe,
    defense,
    device,
    plan: PrecisionPlan,
    outputs: OutputSet,
    reporter: Reporter,
    cache=None,
) -> PurifyReport:
    seed_everything(opts.seed)
    timer = Stopwatch(device)
    check_reference_use(opts, scans=defense.needs_triggers)
    with timer.stage("load"):
        reporter.stage(f"loading data {opts.data}")
        bundle, image_size = load_run_data(opts, [opts.checkpoint], need_train=opts.clean_data is None)
        subject = open_subject(opts, opts.checkpoint, bundle, reporter)
        trigger = resolve_trigger(opts.trigger, opts.target, subject, bundle.test.image_shape, subject.num_classes)
        check_gate_inputs(opts, trigger)
        params, fraction = _defense_params(opts, bundle.name, recipe, defense)
        augmentation = decide_augmentation(opts.augment, bundle)
        params = dataclasses.replace(params, sgd=dataclasses.replace(params.sgd, augment=augmentation.enabled))
        clean, clean_indices = select_clean_set(opts, bundle, fraction, subject)
        recipe, warning = fit_to_clean_data(recipe, clean.num_images, subject.num_classes)
        if warning:
            reporter.warn(warning)
        reporter.info(
            f"{recipe.describe()}: {clean.num_images} clean images"
            + (f", lr {params.sgd.lr}, {params.sgd.epochs} epochs" if defense.trains != "none" else ", no training")
            + (f", alpha {params.own.alpha}" if defense.uses_alpha else "")
        )
        if defense.trains != "none":
            reporter.info(f"augmentation: {augmentation.describe()}")
        model = prepare_model(subject.model, device)
        mean, std = normalization_tensors(subject, device)
        sets = build_eval_sets(bundle.test, trigger, device, opts.eval_limit, opts.seed)
        output_kind = decide_output_kind(opts.output_kind, model, clean, mean, std, device, reporter)
        tune_set, monitor = _holdout(recipe, clean, subject, model, mean, std, device, reporter, opts.seed)
    evidence = None
    # the scan's entries live beside the evaluation cache's (--cache-dir): off without one
    scan_cache = open_scan_cache(cache.root) if cache is not None and cache.root is not None else None
    if defense.needs_triggers:
        with timer.stage("scan"):
            evidence = _scan_for_triggers(
                model,
                tune_set.to(device),
                monitor,
                subject,
                mean,
                std,
                output_kind,
                opts.seed,
                reporter,
                opts.scan_steps,
                opts.precaution,
                reference=open_clean_reference(opts, bundle, subject, device, reporter),
                cache=scan_cache,
            )
        hint = keep_scan_hint(timer.stages["scan"]) if scan_cache is None else None
        if hint:
            reporter.info(hint)
    # nothing flagged (and no --precaution): nothing to remove, so the input is kept as it is (scanning.guided)
    unchanged = evidence is not None and not evidence.chosen
    with timer.stage("choose_format"):
        shape = bundle.test.image_shape
        steps = (
            params.sgd.epochs * steps_per_epoch(tune_set.num_images, params.sgd.batch_size)
            if defense.trains != "none" and not unchanged  # no tuning to run: no format timing to repay
            else 0
        )
        tune_format = untimed_format(
            opts, model, device, steps, 2 * (1 + FORMAT_TIMED_STEPS["train"]), "steps"
        ) or choose_memory_format(
            model,
            example_batch(shape, min(params.sgd.batch_size, tune_set.num_images), device),
            device,
            plan.tune,
            train=True,
            spec=opts.memory_format,
        )
        # Same arithmetic in both stages: the timed training steps' forward halves decide the evaluation too.
        eval_format = (
            evaluation_format_from_tuning(tune_format, model) if working_precision(plan.evaluate) == plan.tune else None
        )
        if eval_format is not None:
            reporter.info(f"evaluation: {plan.evaluate}, {eval_format.format} ({eval_format.reason})")
        else:
            eval_format = choose_eval_format(opts, model, shape, device, plan, reporter, 2 * eval_images(sets))
        formats = {"evaluate": eval_format, "tune": tune_format}
        compute = Compute(device, plan, formats)
        reporter.info(f"tuning: {plan.tune}, {formats['tune'].format} ({formats['tune'].reason})")
    eval_format = formats["evaluate"].format
    with timer.stage("evaluate_before"):
        reporter.stage("evaluating the input model")
        model.to(memory_format=torch_format(eval_format))
        before, cached = measured(
            cache,
            cache_key(cache, subject, bundle, trigger, opts, device, plan.evaluate),
            lambda: evaluate_model(
                model, sets, mean, std, device, opts.eval_batch_size, reporter, plan.evaluate, eval_format
            ),
        )
        if cached:
            reporter.info("the input model's evaluation was read from the evaluation cache")
    with timer.stage("tune"):
        model.to(memory_format=torch_format(formats["tune"].format))
        # a gentler run when the default's unlearning costs the held-out images too much (selection/gentler.py)
        may_soften = (
            recipe.recommended and recipe.select == "last" and monitor is not None and evidence is not None
        ) and not unchanged
        # the input's weights, for the line back to them or the gentler run (one copy, only when either can run)
        start = (
            {k: v.detach().clone() for k, v in model.state_dict().items()}
            if recipe.select == "path" or may_soften
            else None
        )

        def tune(run_params, run_monitor, stop_first_epoch=None):
            return run_defense(
                defense,
                model,
                subject,
                tune_set.to(device),
                mean,
                std,
                run_params,
                device,
                augmentation.flip,
                reporter,
                output_kind,
                run_monitor,
                compute,
                triggers=evidence.chosen if evidence is not None else None,
                windows=evidence.local_triggers() if evidence is not None else None,
                stop_first_epoch=stop_first_epoch,
            )

        def check_dormancy_now():
            return check_dormancy(
                model,
                tune_set.to(device),
                monitor.images if monitor is not None else tune_set.to(device),
                evidence.chosen,
                mean,
                std,
                dormancy_settings(opts.seed, augmentation.enabled),
                device,
                augmentation.flip,
                output_kind.adapter,
                plan.tune,
            )

        gentler, dormancy, undone = None, None, False
        if unchanged:
            outcome = DefenseOutcome(notes=[unchanged_note(evidence)])
        elif may_soften:
            setup = UnlearningSetup(
                tune,
                model,
                start,
                mean,
                std,
                reporter,
                monitor,
                evidence,
                layers_held=functools.partial(layers_held_at, model, tune_set.image_shape, subject.head),
            )
            (outcome, params, gentler, dormancy), _ = unlearn_cheap_co_flags(
                setup,
                params,
                check_dormancy_now,
                may_rerun=opts.frozen_depth is None,
                rerun_distill=RERUN_DISTILL if opts.distill is None else None,  # a --distill the user set is kept
            )
        else:
            outcome = tune(params, monitor)
            # --method unlearn: checked, never rerun (no copy of the input's weights is kept for it)
            if outcome.held is not None and evidence is not None:
                dormancy = held_layers_checked(outcome, check_dormancy_now, reporter)
        if may_soften and not evidence.flagged and not opts.precaution:  # a candidate the reference vouched for
            kept_acc = monitor.curve[-1]["holdout_acc"]  # the kept run's (default_unlearning keeps it so)
            if candidate_too_costly(monitor.base_acc, kept_acc):
                note = undo_costly_candidate(model, start, evidence, monitor.base_acc, kept_acc)
                reporter.warn(note)
                if dormancy is not None:  # neither checked output is written: the input is
                    dormancy.kept = "input"
                outcome, unchanged, undone = DefenseOutcome(notes=[note]), True, True
        selection = monitor.restore(model, params.sgd.epochs) if recipe.select == "epoch" and not unchanged else None
        if selection:
            reporter.info(f"held-out selection: {selection}")
        path_choice = None
        if recipe.select == "path" and not unchanged:
            path_choice = select_on_path(
                model, start, monitor.images, monitor.base_acc, recipe.budget, mean, std, floor=recipe.floor
            )
            del start
            reporter.info(f"path selection: {path_choice.reason}")
    if evidence is not None:
        with timer.stage("verify"):
            # the re-scan in the format the first scan ran in (runtime.prepare_model's channels_last): its mask
            # sizes are compared with that scan's, and fp32 in channels_last searches 7-13% faster on 2 CPU
            # cores (VGG-16-BN, ResNet-32; a forward and backward pass of one scan step's 320 images)
            model.to(memory_format=torch.channels_last)
            _verify_with_scan(
                evidence, model, tune_set.to(device), monitor, mean, std, output_kind, opts.seed, reporter, "fp32"
            )
    with timer.stage("evaluate_after"):
        model.to(memory_format=torch_format(eval_format))
        if unchanged:  # the same weights: the same predictions, not measured twice
            after = before
            if not undone:  # an undone candidate was said in its warning; not twice
                reporter.info(outcome.notes[-1] if outcome.notes else unchanged_note(evidence))
        else:
            reporter.stage("evaluating the purified model")
            after = evaluate_model(
                model, sets, mean, std, device, opts.eval_batch_size, reporter, plan.evaluate, eval_format
            )
    retune = None
    if opts.retune_check:
        with timer.stage("retune_check"):
            retune = retune_checked(
                opts,
                bundle,
                model,
                tune_set,
                trigger,
                sets,
                mean,
                std,
                device,
                after.asr,
                output_kind.adapter,
                reporter,
                plan,
            )
    acc_drop = before.clean_acc.value - after.clean_acc.value
    advice = alpha_advice(defense.uses_alpha, getattr(params.own, "alpha", None), acc_drop)
    if advice:
        reporter.warn(advice)
    gates = check_gates(
        after.asr.value if after.asr else None,
        after.clean_acc.value,
        acc_drop,
        opts.max_asr,
        opts.min_acc,
        opts.max_acc_drop,
    )
    removal = removal_verdict(
        trigger,
        before,
        after,
        evidence,
        dormancy=dormancy,
    )
    if opts.require_verified:
        verified = removal.verdict == "verified"
        gates.append(GateResult("require-verified", 1.0, float(verified), verified))
    report = PurifyReport(
        subject=subject.describe(),
        data=describe_data(bundle, sets, image_size),
        trigger=describe_trigger(trigger),
        method={
            "name": defense.name,
            "recipe": recipe.to_dict(),
            "summary": defense.summary,
            "reinit_head": defense.reinit_head,
            "trains": defense.trains,
            "head_norm": outcome.head_norm,
            "params": {k: v for k, v in params.to_dict().items() if k in defense.used_params},
            "augmentation": augmentation.to_dict() if defense.trains != "none" else None,
            "notes": list(outcome.notes),
        },
        clean={
            "source": opts.clean_data or "training split",
            "images": clean.num_images,
            "tuned_on": tune_set.num_images,
            "holdout": (
                {
                    **monitor.to_dict(),
                    "selection": selection,
                    "path": path_choice.to_dict() if path_choice is not None else None,
                    "gentler": gentler.to_dict() if gentler is not None else None,
                }
                if monitor is not None
                else None
            ),
            "fraction": fraction,
            "indices_sha256": indices_sha256(clean_indices) if clean_indices is not None else None,
            "class_counts": torch.bincount(clean.y.cpu(), minlength=subject.num_classes).tolist(),
        },
        before=before,
        after=after,
        der=(
            defense_effectiveness_rating(
                before.clean_acc.value, after.clean_acc.value, before.asr.value, after.asr.value
            )
            if before.asr and after.asr
            else None
        ),
        history=[h.to_dict() for h in outcome.history],
        gates=gates,
        timings={},
        environment=environment(device, compute),
        options=to_yaml_dict(opts),
        outputs={},
        output_kind=output_kind.to_dict(),
        retune=retune.to_dict() if retune is not None else None,
        removal=removal.to_dict(),
        scan=(
            {**evidence.to_dict(), "dormancy": dormancy.to_dict() if dormancy is not None else None}
            if evidence is not None
            else None
        ),
    )
    with timer.stage("write"):
        import yaml

        state = export_weights(model, subject)
        meta = _purified_metadata(subject, bundle, trigger, report, compute)
        blob = safetensors_bytes(state, meta)
        outputs.stage("purified.safetensors", blob)
        report.outputs["purified.safetensors"] = hashlib.sha256(blob).hexdigest()
        if subject.hub is not None:
            for name, data in hub.hub_layout(subject.hub, state, meta).items():
                outputs.stage(f"{hub.OUTPUT_DIR}/{name}", data)
                report.outputs[f"{hub.OUTPUT_DIR}/{name}"] = hashlib.sha256(data).hexdigest()
        if clean_indices is not None:
            outputs.stage("clean_indices.txt", "".join(f"{i}\n" for i in clean_indices.tolist()).encode())
        outputs.stage("config.yaml", yaml.safe_dump(report.options, sort_keys=False).encode())
        report.outputs["config.yaml"] = "config.yaml"
        if clean_indices is not None:
            report.outputs["clean_indices.txt"] = "clean_indices.txt"
        report.timings = dict(timer.stages)
        stage_purify_report(outputs, report)
    report.timings = dict(timer.stages)
    return report


UNCHANGED_NOTE = (
    "the scan flagged no class, so nothing was tuned: the output holds the input model's weights "
    "(--precaution unlearns the smallest-mask class anyway; --method NAME runs a trigger-free defense)"
)


def unchanged_note(evidence: ScanEvidence | None) -> str:
    """Why a default purify tuned nothing: nothing flagged, or only shortcuts the clean reference shares."""
    natural = evidence.natural if evidence is not None else {}
    if not natural:
        return UNCHANGED_NOTE
    classes = ", ".join(f"class {c}" for c in natural)
    return (
        f"the scan flagged {classes}, and the clean reference follows its reconstruction too (a shortcut of the "
        "data, not a planted trigger), so nothing was tuned: the output holds the input model's weights"
    )


def _scan_for_triggers(
    model,
    tune_set: ImageSet,
    monitor: HoldoutMonitor | None,
    subject: Subject,
    mean,
    std,
    output_kind: OutputKind,
    seed: int,
    reporter: Reporter,
    steps: int | None,
    precaution: bool = False,
    reference: CleanReference | None = None,
    cache: ScanCache | None = None,
) -> ScanEvidence:
    """Invert a trigger per class on the tuning images, choose what to unlearn, and measure its proxy ASR on
    the held-out images (on the tuning images when none are held out, which the report says). With a clean
    `reference`, a chosen trigger the reference follows too is set aside."""
    reporter.stage("scanning for a backdoor (trigger inversion per class)")
    params = InversionParams(**({"steps": steps} if steps is not None else {})).validate()
    # fp32 search, as `bdclean scan`: which class is flagged must not depend on the machine's bf16 (measured on
    # the clean ResNet-20: a bf16 search flagged class 0 at anomaly index 3.13, the fp32 scans of it flag nothing)
    result = run_scan(
        model, tune_set, subject.num_classes, mean, std, output_kind.adapter, params, seed, reporter, "fp32", cache
    )
    chosen, choice = choose_triggers(result, precaution)
    proxy_set, where = (
        (monitor.images, "held-out clean images")
        if monitor is not None
        else (tune_set, "the tuning images (none held out): the images the trigger was reconstructed from")
    )
    check = None
    candidate = candidate_below_threshold(result) if reference is not None and not chosen else None
    if reference is not None and chosen:
        check = check_reference(reference, proxy_set, chosen, model, mean, std)
        chosen, choice = set_aside_natural(chosen, choice, check)
    elif candidate is not None:  # nothing flagged: the reference may vouch for the smallest mask (scanning.guided)
        check = check_reference(reference, proxy_set, [candidate], model, mean, std)
        chosen, choice = vouch_for_candidate(candidate, result, check)
    evidence = ScanEvidence(
        result=result,
        params=params,
        chosen=chosen,
        choice=choice,
        proxy_images=where,
        proxy_before=proxy_rates(model, proxy_set, chosen, mean, std),
        proxy_local=local_rates(model, proxy_set, chosen, mean, std),
        reference=check,
        clean_reference=reference,
    )
    flagged = ", ".join(f"class {c} (anomaly index {result.anomaly[c]:.2f})" for c in result.flagged) or "no class"
    reporter.info(f"scan: {flagged} flagged; {choice}")
    for target, rate in evidence.proxy_before.items():
        reporter.info(
            f"class {target}: the reconstructed trigger sends {rate.value:.1%} of the {where.split(':')[0]} "
            "of other classes there"
        )
    return evidence


def _verify_with_scan(
    evidence: ScanEvidence,
    model,
    tune_set: ImageSet,
    monitor: HoldoutMonitor | None,
    mean,
    std,
    output_kind: OutputKind,
    seed: int,
    reporter: Reporter,
    precision: str,
) -> None:
    """The chosen triggers' proxy ASR on the purified model, and a re-scan of every flagged class."""
    reporter.stage("verifying the removal with the scan's triggers")
    proxy_set = monitor.images if monitor is not None else tune_set
    evidence.proxy_after = proxy_rates(model, proxy_set, evidence.chosen, mean, std)
    if evidence.suspected:
        evidence.rescan = rescan(
            model,
            tune_set,
            evidence.suspected,
            evidence.result,
            mean,
            std,
            output_kind.adapter,
            evidence.params,
            seed,
            precision,
            reference=evidence.clean_reference if evidence.reference and evidence.reference.usable else None,
            reference_images=proxy_set,
        )
    for target, rate in evidence.proxy_after.items():
        again = evidence.rescan.get(target)
        reporter.info(
            f"class {target}: proxy ASR {evidence.proxy_before[target].value:.1%} -> {rate.value:.1%}"
            + (
                f"; re-scan mask L1 {again['input_mask_l1']:g} -> {again['mask_l1']:g} (anomaly index "
                f"{again['anomaly_index']:.2f}{', still flagged' if again['flagged'] else ''}"
                + (
                    f"; the clean reference follows it on {again['reference_rate']['value']:.1%}"
                    + (": a shortcut of the data" if again["shortcut"] else "")
                    if "reference_rate" in again
                    else ""
                )
                + ")"
                if again
                else ""
            )
        )


def removal_verdict(
    trigger,
    before,
    after,
    evidence: ScanEvidence | None,
    dormancy: DormancyRecord | None = None,
):
    """The given trigger's verdict, the scan's, or both combined (verdicts/removal.py). A clean reference the
    scan could not use (too weak, or a bundled one these images are not the task of) is named in the scan's
    reason, since it alone keeps the scan from saying `verified`. `dormancy`: the dormancy check of a held-layer
    unlearning; a reconstruction that comes back on the output fails the scan's verdict."""
    by_scan = None
    if evidence is not None:
        by_scan = judge_removal_by_scan(
            evidence.suspected,
            [t.target for t in evidence.chosen],
            evidence.proxy_before,
            evidence.proxy_after,
            evidence.rescan,
            natural=evidence.natural,
            planted=evidence.reference.planted if evidence.reference is not None else None,
            local=evidence.proxy_local,
            dormant=dormancy.dormant if dormancy is not None else None,
            dormancy=dormancy.to_dict() if dormancy is not None else None,
        )
        if evidence.left:
            by_scan = with_co_flags_left(by_scan, evidence.co_flag_trial)
        if evidence.reference is not None and not evidence.reference.usable:
            by_scan = dataclasses.replace(by_scan, reason=f"{by_scan.reason} ({evidence.reference.unusable_reason()})")
    if trigger is None and by_scan is not None:
        return by_scan
    return combine_verdicts(
        judge_removal(describe_trigger(trigger), before.asr, after.asr, after.asr_no_trigger), by_scan
    )


def alpha_advice(uses_alpha: bool, alpha: float | None, acc_drop: float) -> str | None:
    """A hint when an alpha-based defence (FST) cost more clean accuracy than ALPHA_ADVICE_DROP."""
    if not uses_alpha or alpha is None or acc_drop <= ALPHA_ADVICE_DROP:
        return None
    return (
        f"clean accuracy fell by {acc_drop * 100:.1f} points. alpha {alpha:g} (the paper's default for "
        f"ResNet-18) can be too strong for a smaller or weaker model: a smaller --alpha (e.g. 0.05) or more "
        f"--epochs usually costs less accuracy (docs/reproduction.md). Check the ASR it leaves."
    )


def _holdout(
    recipe: Recipe, clean: ImageSet, subject: Subject, model, mean, std, device, reporter: Reporter, seed: int
):
    """(images to tune on, HoldoutMonitor or None): the recipe's held-out part is kept out of tuning.
    The monitor picks epochs only for the epoch selection; otherwise it records the curve."""
    if not recipe.holdout_fraction:
        return clean, None
    tune_set, held = split_holdout(clean, recipe.holdout_fraction, seed, subject.num_classes)
    held = held.to(device)
    monitor = HoldoutMonitor(
        held, top1_accuracy(model, held, mean, std), budget=recipe.budget if recipe.select == "epoch" else None
    )
    reporter.info(
        f"held out {held.num_images} of the {clean.num_images} clean images (input model: "
        f"{monitor.base_acc:.1%} on them)" + (f"; budget {recipe.budget:.1%}" if recipe.budget is not None else "")
    )
    warning = memorised_warning(monitor.base_acc)
    if warning:
        reporter.warn(warning)
    return tune_set, monitor


def _purified_metadata(
    subject: Subject, bundle: DatasetBundle, trigger, report: PurifyReport, compute: Compute | None = None
) -> dict:
    from .. import __version__

    meta = subject_metadata(subject, bundle)
    meta.update(
        {
            "tool_version": __version__,
            "trigger": trigger.to_dict() if trigger is not None else subject.checkpoint.metadata.get("trigger"),
            "purification": {
                "method": report.method["name"],
                "params": report.method["params"],
                "recipe": report.method["recipe"],
                "path_t": ((report.clean.get("holdout") or {}).get("path") or {}).get("chosen_t"),
                "input_sha256": subject.checkpoint.sha256,
                "clean_indices_sha256": report.clean["indices_sha256"],
                "clean_images": report.clean["images"],
                "before": replayable_metrics(report.before),
                "after": replayable_metrics(report.after),
                "der": report.der,
                **({"compute": compute.replayable()} if compute is not None else {}),
            },
            "origin": {
                k: v for k, v in subject.checkpoint.metadata.items() if k in ("poison_rate", "seed", "trained_by")
            },
        }
    )
    return meta
