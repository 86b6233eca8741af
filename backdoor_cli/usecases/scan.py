"""The scan use case: load a checkpoint and a few hundred clean images, invert a trigger per class,
flag outliers, and write the reconstructed triggers as bdclean trigger specs.

    scan_checkpoint(opts)
      read checkpoint -> build + load strictly -> clean scan images (training split or --clean-data)
      -> probe the output kind -> scan.scan_model -> [--clean-reference: the flagged classes'
      reconstructions on a clean model: shortcuts of the data or planted] -> report (+ --out: per
      flagged class a preview PNG, the pattern and mask PNGs and a `type: image` spec YAML, and scan.json)

The test split is loaded only because the model loader reads the image shape from it; no test image
and no recorded trigger is used by the scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..config import ScanOptions, to_yaml_dict
from ..data.datasets import indices_sha256
from ..outputs import OutputSet
from ..progress import Reporter
from ..reports.report import to_json
from ..reports.scan_report import ScanReport, png_bytes, preview_png, trigger_pixels, trigger_spec_yaml
from ..runtime import Stopwatch, environment, prepare_model, resolve_device, seed_everything
from ..scanning.cache import ScanCache, keep_scan_hint
from ..scanning.guided import (
    candidate_below_threshold,
    check_reference,
    local_rates,
    local_share,
    proxy_rates,
    run_scan,
)
from ..scanning.inversion import InversionParams
from ..subject import normalization_tensors
from .references import open_clean_reference
from .setup import (
    decide_output_kind,
    input_paths,
    load_run_data,
    open_subject,
    select_clean_set,
)

DEFAULT_IMAGES = 200  # class-balanced scan images when neither --clean-count nor --clean-data is given
METHOD = "neural-cleanse"
REPORT_NAME = "scan.json"


def class_output_names(target: int) -> dict[str, str]:
    """The files written for one flagged class, by role."""
    stem = f"class{target}"
    return {
        "preview": f"{stem}-preview.png",
        "image": f"{stem}-trigger.png",
        "mask": f"{stem}-mask.png",
        "spec": f"{stem}-trigger.yaml",
    }


def scan_checkpoint(opts: ScanOptions, reporter: Reporter | None = None, cache: ScanCache | None = None) -> ScanReport:
    """Scan one checkpoint for a backdoor without knowing its trigger; write triggers to --out if given. With a
    `cache` (scanning/cache.py), a scan of the same model, images and settings is read back instead."""
    reporter = reporter or Reporter()
    device = resolve_device(opts.device)
    params = InversionParams(steps=opts.steps, batch_size=opts.batch_size, threshold=opts.anomaly_threshold).validate()
    seed_everything(opts.seed)
    timer = Stopwatch(device)
    with timer.stage("load"):
        reporter.stage(f"loading data {opts.data}")
        bundle, image_size = load_run_data(opts, [opts.checkpoint], need_train=opts.clean_data is None)
        subject = open_subject(opts, opts.checkpoint, bundle, reporter)
    if opts.out is None:
        return _scan(opts, params, bundle, image_size, subject, device, timer, None, reporter, cache)
    # Every class's file names are declared up front so a bad --out fails now, not after the scan.
    names = [REPORT_NAME] + [n for c in range(subject.num_classes) for n in class_output_names(c).values()]
    with OutputSet(Path(opts.out), names, input_paths(opts, opts.checkpoint), opts.force) as outputs:
        report = _scan(opts, params, bundle, image_size, subject, device, timer, outputs, reporter, cache)
        reporter.stage(f"writing outputs to {opts.out}")
        outputs.commit()
    return report


def _scan(
    opts: ScanOptions,
    params: InversionParams,
    bundle,
    image_size,
    subject,
    device,
    timer: Stopwatch,
    outputs: OutputSet | None,
    reporter: Reporter,
    cache: ScanCache | None = None,
) -> ScanReport:
    with timer.stage("load"):
        clean_opts = opts
        if not opts.clean_data and opts.clean_count is None and opts.clean_fraction is None:
            clean_opts = dataclasses.replace(opts, clean_count=DEFAULT_IMAGES)
        clean, indices = select_clean_set(clean_opts, bundle, clean_opts.clean_fraction, subject)
        clean = clean.to(device)
        model = prepare_model(subject.model, device)
        mean, std = normalization_tensors(subject, device)
        output_kind = decide_output_kind(opts.output_kind, model, clean, mean, std, device, reporter)
        reference = open_clean_reference(opts, bundle, subject, device, reporter)
    reporter.info(
        f"{METHOD}: {clean.num_images} clean images, {params.steps} steps x {subject.num_classes} classes "
        f"({params.group} at a time), batch {params.batch_size} per class"
    )
    with timer.stage("scan"):
        # fp32 search: the scan's own figures (mask sizes, anomaly indices) are the same on every machine
        result = run_scan(
            model,
            clean,
            subject.num_classes,
            mean,
            std,
            output_kind.adapter,
            params,
            opts.seed,
            reporter,
            precision="fp32",
            cache=cache,
        )
    hint = keep_scan_hint(timer.stages["scan"]) if cache is None else None
    if hint:
        reporter.info(hint)
    check = None
    # Nothing flagged: the smallest mask is still a candidate the reference may show to be planted (as purify's
    # default unlearns it, scanning.guided.vouch_for_candidate)
    candidate = candidate_below_threshold(result) if reference is not None else None
    tried = [result.triggers[c] for c in result.flagged] or ([candidate] if candidate is not None else [])
    if reference is not None and tried:
        # the scan's own images: the reference never saw the reconstruction, so they are as good as any
        with timer.stage("reference"):
            check = check_reference(reference, clean, tried, model, mean, std)
        reporter.info(
            "clean reference: "
            + ", ".join(f"class {c} {rate.value:.1%}" for c, rate in check.rates.items())
            + f" of its other-class scan images sent there (a shortcut of the data at >= {check.threshold:.0%})"
            + ("" if check.usable else "; " + check.unusable_reason())
        )
    local = {}
    if result.flagged:
        # How local each flagged reconstruction is (scanning.guided.localize): a spread-out one approximates a
        # blend-, signal- or warp-like trigger, and removing the approximation may leave part of it.
        with timer.stage("locality"):
            flagged = [result.triggers[c] for c in result.flagged]
            whole = proxy_rates(model, clean, flagged, mean, std)
            local = {
                c: local_share(rate, whole[c]) for c, rate in local_rates(model, clean, flagged, mean, std).items()
            }
    report = ScanReport(
        subject=subject.describe(),
        data={
            "name": bundle.name,
            "source": bundle.source,
            "num_classes": bundle.num_classes,
            "image_shape": list(clean.image_shape),
            "image_size": list(image_size) if image_size else None,
            "scan_images": clean.num_images,
            "scan_source": opts.clean_data or "training split",
            "indices_sha256": indices_sha256(indices) if indices is not None else None,
            "class_counts": torch.bincount(clean.y.cpu(), minlength=subject.num_classes).tolist(),
        },
        method={
            "name": METHOD,
            "summary": "per class, the smallest mask + pattern sending clean images of other "
            "classes there (Wang et al. 2019); MAD outlier test on the mask L1 norms",
            "params": params.to_dict(),
        },
        result=result,
        timings={},
        environment=environment(device),
        options=to_yaml_dict(opts),
        output_kind=output_kind.to_dict(),
        reference=check,
        reference_path=reference.path if reference is not None else None,
        local=local,
        candidate=candidate.target if candidate is not None else None,
    )
    if outputs is not None:
        with timer.stage("write"):
            _stage_triggers(report, outputs)
            report.timings = dict(timer.stages)
            outputs.stage(REPORT_NAME, to_json(report).encode())
    report.timings = dict(timer.stages)
    return report


def _stage_triggers(report: ScanReport, outputs: OutputSet) -> None:
    """Per flagged class: preview, pattern and mask PNGs, and the spec that `--trigger` reads back."""
    for target in report.result.flagged:
        trigger = report.result.triggers[target]
        names = class_output_names(target)
        pattern, mask = trigger_pixels(trigger)
        image_png, mask_png = png_bytes(pattern), png_bytes(mask)
        outputs.stage(names["preview"], preview_png(trigger))
        outputs.stage(names["image"], image_png)
        outputs.stage(names["mask"], mask_png)
        outputs.stage(
            names["spec"],
            trigger_spec_yaml(
                target,
                names["image"],
                names["mask"],
                hashlib.sha256(image_png).hexdigest(),
                hashlib.sha256(mask_png).hexdigest(),
            ),
        )
        report.outputs.update({name: name for name in names.values()})
    report.outputs[REPORT_NAME] = REPORT_NAME
