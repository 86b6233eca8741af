"""`bdclean convert CKPT --data ... [--arch ...] [--mean ...] [--std ...]`: write a checkpoint bdclean can read
as a bdclean .safetensors that records its own architecture, head and normalisation.

Why: a foreign checkpoint needs its flags on every command, and a flag given for one model applies to every
model of that command, so a foreign clean model of *another* architecture cannot be given as the
`--clean-reference` of a suspect. Converted once, it carries its own facts and needs no flags.

A conversion is only written when it is checked:
- the written bytes are read back by the same loader every command uses, with no flags, and must give the
  same architecture, classes, head, normalisation, weights (bit for bit) and logits as the input;
- the model is evaluated on the test split: near chance level the flags are most likely wrong (a wrong
  --mean/--std or --arch still loads), so that is refused unless --min-acc says what is acceptable.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..checkpoint import parse_checkpoint, safetensors_bytes
from ..config import ConvertOptions, to_yaml_dict
from ..errors import InputError, OutputError
from ..evaluation.gates import check_gates
from ..evaluation.measure import EvalResult, build_eval_sets, eval_mode, evaluate_model
from ..evaluation.metrics import at_chance
from ..outputs import OutputSet
from ..precision import exact_fp32, resolve_precision
from ..progress import Reporter
from ..reports.convert_report import ConvertReport
from ..runtime import Stopwatch, environment, prepare_model, resolve_device, seed_everything
from ..subject import Subject, export_weights, load_subject, normalization_tensors
from .setup import describe_data, input_paths, load_run_data, open_subject, replayable_metrics, subject_metadata

ROUND_TRIP_IMAGES = 16  # seeded random images both copies must give identical logits on


def default_converted_name(checkpoint: str) -> str:
    """resnet20-12fca82f.th -> resnet20-12fca82f.bdclean.safetensors (in the current directory)."""
    path = Path(checkpoint.rstrip("/"))
    return f"{path.stem if path.suffix else path.name}.bdclean.safetensors"


def convert_checkpoint(opts: ConvertOptions, reporter: Reporter | None = None) -> ConvertReport:
    """Load `opts.checkpoint` with its flags, check it, and write it with the metadata that replaces them."""
    reporter = reporter or Reporter()
    if not opts.out:
        opts = dataclasses.replace(opts, out=default_converted_name(opts.checkpoint))
        reporter.info(f"no --out given: writing {opts.out}")
    out = Path(opts.out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory; give a file name such as model.safetensors")
    if out.suffix != ".safetensors":
        raise OutputError(
            f"--out {out}: a converted checkpoint is a .safetensors file", hint=f"e.g. --out {out.stem}.safetensors"
        )
    device = resolve_device(opts.device)
    plan = resolve_precision("auto", device)
    seed_everything(opts.seed)
    timer = Stopwatch(device)
    with OutputSet(out.parent, [out.name], input_paths(opts, opts.checkpoint), opts.force) as outputs:
        with timer.stage("load"):
            reporter.stage(f"loading data {opts.data}")
            bundle, image_size = load_run_data(opts, [opts.checkpoint], need_train=False)
            subject = open_subject(opts, opts.checkpoint, bundle, reporter)
            model = prepare_model(subject.model, device).eval()
            mean, std = normalization_tensors(subject, device)
            sets = build_eval_sets(bundle.test, None, device, opts.eval_limit, opts.seed)
        with timer.stage("evaluate"):
            reporter.stage(f"checking the model on {sets.clean.num_images} test images")
            result = evaluate_model(
                model, sets, mean, std, device, opts.batch_size, reporter, plan.evaluate, "contiguous"
            )
        gates = check_gates(None, result.clean_acc.value, min_acc=opts.min_acc)
        if opts.min_acc is None:
            _refuse_chance_level(result, subject)
        with timer.stage("write"):
            meta = _converted_metadata(subject, bundle, result)
            blob = safetensors_bytes(export_weights(model, subject), meta)
            round_trip = check_round_trip(blob, out, subject, model, bundle, device)
            sha = None
            if all(g.passed for g in gates):
                outputs.stage(out.name, blob)
                outputs.commit()
                sha = hashlib.sha256(blob).hexdigest()
    return ConvertReport(
        out=str(out),
        sha256=sha,
        subject=subject.describe(),
        data=describe_data(bundle, sets, image_size),
        result=result,
        round_trip=round_trip,
        gates=gates,
        timings=dict(timer.stages),
        environment=environment(device, None),
        options=to_yaml_dict(opts),
    )


def _refuse_chance_level(result: EvalResult, subject: Subject) -> None:
    chance = 1.0 / subject.num_classes
    acc = result.clean_acc
    if at_chance(acc, subject.num_classes):  # the model is not fed as it was trained: refused (--min-acc 0 overrides)
        sources = subject.sources
        raise InputError(
            f"the model scores {acc.value:.2%} on {acc.n} test images, chance level ({chance:.1%}): it is not being "
            f"fed as it was trained (architecture from {sources.get('arch')}, normalisation from "
            f"{sources.get('mean')}), so nothing was written",
            hint="check --arch, --mean/--std (its training normalisation) and --head; to write it anyway, "
            "pass --min-acc 0",
        )


def _converted_metadata(subject: Subject, bundle, result: EvalResult) -> dict:
    from .. import __version__

    meta = subject_metadata(subject, bundle)
    meta.update(
        {
            "tool_version": __version__,
            "converted_from": {
                "path": str(subject.checkpoint.path),
                "sha256": subject.checkpoint.sha256,
                "format": subject.checkpoint.format,
                "resolved_from": dict(subject.sources),
            },
            "test_metrics": replayable_metrics(result),
            # What the input recorded about how it was made, when it was a bdclean file itself.
            "origin": {
                k: v
                for k, v in subject.checkpoint.metadata.items()
                if k in ("trigger", "poison_rate", "seed", "trained_by")
            },
        }
    )
    return meta


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, a NaN matching a NaN (a broken model's logits are still its own)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def check_round_trip(blob: bytes, out: Path, subject: Subject, model: torch.nn.Module, bundle, device) -> dict:
    """Read the bytes about to be written back through the loader every command uses, with no flags, and
    demand the same model: a conversion that would not load as the input did is an error, never a file.
    `model`: the input as the run prepared it (runtime.prepare_model), the copy is prepared the same way, so
    the logits come from the same kernels."""
    copy = load_subject(str(out), bundle, checkpoint=parse_checkpoint(blob, out))
    facts = ("arch", "num_classes", "in_channels", "head", "mean", "std")
    differ = [f for f in facts if getattr(copy, f) != getattr(subject, f)]
    theirs = copy.model.state_dict()
    ours = model.state_dict()
    weights_equal = theirs.keys() == ours.keys() and all(
        same_values(theirs[k].cpu(), ours[k].detach().cpu()) for k in ours
    )
    copy_model = prepare_model(copy.model, device)
    generator = torch.Generator().manual_seed(0)
    h, w, c = bundle.test.image_shape
    x = torch.rand(ROUND_TRIP_IMAGES, c, h, w, generator=generator).to(device)
    with torch.no_grad(), exact_fp32(device), eval_mode(model), eval_mode(copy_model):
        logits_equal = same_values(model(x), copy_model(x))
    if differ or not weights_equal or not logits_equal:
        what = ", ".join(differ + ([] if weights_equal else ["weights"]) + ([] if logits_equal else ["logits"]))
        raise InputError(
            f"the converted copy of {subject.checkpoint.path} would not load as the input did ({what} differ), "
            "so nothing was written",
            hint="this is most likely a bdclean bug; please report it with `bdclean inspect` of the input",
        )
    return {"facts_equal": list(facts), "weights_equal": True, "logits_equal": True, "images": ROUND_TRIP_IMAGES}
