"""What every use case sets up first, and the provenance it records.

The load stage: the data (--data required, the image size a hub model or a checkpoint asks for), the
subject, the trigger (given, or recorded in the checkpoint), the clean set, the output kind, the memory
format; how the data and the trigger are described in reports and cache keys; the metadata a written
checkpoint carries so it can be replayed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import EvaluateOptions, PurifyOptions
from ..data.datasets import (
    DatasetBundle,
    ImageSet,
    ImageSizeError,
    load_clean_folder,
    load_dataset,
    normalize,
    select_clean_subset,
)
from ..data.imagefolder import TRANSFORM
from ..data.streaming import materialize
from ..errors import ConfigError, InputError
from ..evaluation.cache import data_fingerprint, eval_key
from ..evaluation.measure import EvalSets
from ..models.output_kind import (
    PROBE_IMAGES,
    LossAdapter,
    OutputKind,
    parse_output_kind,
    probe_outputs,
    resolve_output_kind,
)
from ..precision import (
    FORMAT_TIMED_STEPS,
    MEMORY_FORMATS,
    FormatChoice,
    autocast,
    choose_memory_format,
    eval_timing_batch,
    example_batch,
    parse_choice,
    torch_format,
)
from ..progress import Reporter
from ..subject import Subject, load_subject
from ..triggers import build_trigger, load_trigger_spec, parse_trigger_spec


def require_data(data: str | None) -> str:
    if not data:
        raise ConfigError(
            "--data is required", hint="a dataset name (cifar10, mnist, ...) with --data-dir, or a directory"
        )
    return data


def resolve_trigger(spec_text: str | None, target: int | None, subject: Subject | None, image_shape, num_classes: int):
    """The trigger from --trigger, else the one recorded in the checkpoint's metadata, else none."""
    spec = None
    if spec_text is not None:
        if not spec_text.strip():
            raise ConfigError(
                "--trigger is empty", hint="a built-in name (badnets, blended, sig, wanet) or a YAML spec file"
            )
        spec = load_trigger_spec(spec_text)
    elif subject is not None and subject.checkpoint.metadata.get("trigger"):
        spec = parse_trigger_spec(subject.checkpoint.metadata["trigger"], None, source="checkpoint metadata")
    if spec is None:
        if target is not None:
            raise ConfigError("--target needs a trigger", hint="pass --trigger badnets (or a YAML spec)")
        return None
    if target is not None:
        spec = dataclasses.replace(spec, target=target)
    if not 0 <= spec.target < num_classes:
        raise ConfigError(f"trigger target {spec.target} is not a class of this model (0..{num_classes - 1})")
    return build_trigger(spec, tuple(image_shape))


def open_subject(
    opts: EvaluateOptions, checkpoint: str, bundle: DatasetBundle, reporter: Reporter, read: Checkpoint | None = None
) -> Subject:
    """`checkpoint` loaded with the run's flags; `read`: its file, when the caller has already read it."""
    reporter.stage(f"loading checkpoint {checkpoint}")
    subject = load_subject(
        checkpoint,
        bundle,
        arch=opts.arch,
        num_classes=opts.num_classes,
        head=opts.head,
        mean=opts.mean,
        std=opts.std,
        checkpoint=read,
    )
    for note in subject.notes:
        reporter.warn(note)
    return subject


def _image_size(opts, checkpoints) -> tuple[int, int] | None:
    """--image-size, else the input size a Hugging Face/timm model directory's config names (the
    first such among `checkpoints`), so image folders are resized to what the model was made for."""
    if opts.image_size is not None:
        return opts.image_size
    from ..models.hub_config import configured_image_size

    return next((size for size in map(configured_image_size, checkpoints) if size is not None), None)


def load_run_data(opts, checkpoints, need_train: bool) -> tuple[DatasetBundle, tuple[int, int] | None]:
    """(the dataset, the image size it was resized to or None): the size is worked out once here."""
    size = _image_size(opts, checkpoints)
    try:
        return load_dataset(require_data(opts.data), opts.data_dir, need_train=need_train, image_size=size), size
    except ImageSizeError as exc:
        if opts.image_size is not None:
            raise
        # The size came from the model directory's config, not from a flag: say so.
        (h, w), (sh, sw) = size, exc.stored
        raise InputError(
            f"the model expects {w}x{h} images (its config) but the data is {sw}x{sh}",
            hint="image folders are resized to the model's size automatically (or with --image-size); "
            f"npz data is used as stored, so save it at {w}x{h}",
        ) from None


# On CPU, --memory-format timed times both formats at start-up (precision.choose_memory_format). That
# timing is work the run does not keep, and the faster format repays only a fraction of the run's own
# work, so the formats are timed only when the work they decide is at least this many times the timing's
# cost: a full test-set evaluation or a paper-length tuning is timed, a --eval-limit 500 check or a
# one-epoch tuning of 200 images keeps channels_last untimed (that timing cost more than the run's work).
FORMAT_PAYBACK = 8


def untimed_format(opts, model, device, work: int, cost: int, unit: str) -> FormatChoice | None:
    """channels_last, untimed, when timing both (CPU, --memory-format timed) would cost more than it
    can repay: the timing runs `cost` images/steps that the run does not keep, and the faster format
    saves a fraction (10-40%, issue 16) of the run's own `work`. None: time them."""
    if device.type != "cpu" or parse_choice(opts.memory_format, MEMORY_FORMATS, "--memory-format") != "timed":
        return None
    if work >= FORMAT_PAYBACK * cost:
        return None
    model.to(memory_format=torch_format("channels_last"))
    return FormatChoice(
        "channels_last", f"default (not timed: {work} {unit} to run would not repay the {cost} of timing both formats)"
    )


def choose_eval_format(opts, model, image_shape, device, plan, reporter: Reporter, images: int):
    """The evaluation memory format: --memory-format, or the faster of the two on a forward pass
    (`images`: how many images the run will evaluate in it, to tell whether timing is worth it)."""
    batch = eval_timing_batch(image_shape)
    choice = untimed_format(opts, model, device, images, 2 * (1 + FORMAT_TIMED_STEPS["eval"]) * batch, "images")
    if choice is None:
        choice = choose_memory_format(
            model,
            example_batch(image_shape, batch, device),
            device,
            plan.evaluate,
            train=False,
            spec=opts.memory_format,
        )
    reporter.info(f"evaluation: {plan.evaluate}, {choice.format} ({choice.reason})")
    return choice


def eval_images(sets: EvalSets) -> int:
    return sets.clean.num_images + sets.num_poisoned


def check_gate_inputs(opts, trigger) -> None:
    if opts.max_asr is not None and trigger is None:
        raise ConfigError("--max-asr needs a trigger to measure ASR", hint="pass --trigger")
    if getattr(opts, "retune_check", False) and trigger is None:
        raise ConfigError("--retune-check needs a trigger", hint="pass --trigger (a built-in name or a spec file)")


def cache_key(cache, subject: Subject, bundle: DatasetBundle, trigger, opts, device, precision: str):
    """The CacheKey of this evaluation, or None without a cache (hashing the test images costs a little).
    The precision is part of it: bf16 and fp32 evaluations may differ in a few predictions."""
    if cache is None:
        return None
    return eval_key(
        subject.checkpoint.sha256,
        subject,
        data_fingerprint(bundle.test),
        trigger,
        opts.eval_limit,
        opts.seed,
        device,
        precision,
    )


def describe_data(bundle: DatasetBundle, sets: EvalSets, image_size=None) -> dict:
    return {
        "name": bundle.name,
        "source": bundle.source,
        "num_classes": bundle.num_classes,
        "image_shape": list(bundle.test.image_shape),
        "test_images": sets.clean.num_images,
        "eval_limited": sets.limited,
        "image_size": list(image_size) if image_size else None,
        "resize": TRANSFORM if image_size else None,
        "streamed": sets.streamed,
        "asr_set": "test images whose true class is not the target, with the trigger applied",
    }


def describe_trigger(trigger) -> dict | None:
    return trigger.to_dict() if trigger is not None else None


def select_clean_set(opts: PurifyOptions, bundle: DatasetBundle, fraction: float | None, subject: Subject):
    """The defender's clean data: the user's own images, or a seeded class-balanced training subset."""
    num_classes = subject.num_classes
    if opts.clean_data:
        if opts.clean_fraction is not None or opts.clean_count is not None:
            raise ConfigError("--clean-data cannot be combined with --clean-fraction/--clean-count")
        clean = load_clean_folder(opts.clean_data, opts.image_size)
        (h, w, c), (th, tw, tc) = clean.image_shape, bundle.test.image_shape
        if c != tc:
            raise InputError(f"--clean-data images have {c} channel(s) but the model takes {tc}-channel images")
        if (h, w) != (th, tw):
            raise InputError(
                f"--clean-data images are {w}x{h} pixels but the test images are {tw}x{th}",
                hint="pass --image-size to resize both image folders, or resize them first",
            )
        if int(clean.y.max()) >= num_classes:
            raise InputError(f"--clean-data has label {int(clean.y.max())}, outside the model's {num_classes} classes")
        if len(torch.unique(clean.y)) < 2:
            raise InputError("--clean-data holds a single class; tuning needs clean images of several classes")
        return clean, None
    if bundle.train is None:
        raise InputError(f"{bundle.source} has no training split to draw clean data from", hint="pass --clean-data DIR")
    indices = select_clean_subset(bundle.train.y, fraction, opts.clean_count, opts.seed, num_classes)
    return materialize(bundle.train.subset(indices)), indices


def input_paths(opts, *extra) -> list[Path]:
    """Every file or directory a run reads: outputs may never replace or land inside one of them."""
    candidates = [
        getattr(opts, "config", None),
        getattr(opts, "trigger", None),
        getattr(opts, "data", None),
        getattr(opts, "clean_data", None),
        getattr(opts, "clean_reference", None),
        *extra,
    ]
    paths = []
    for value in candidates:
        if value and Path(str(value)).exists():
            paths.append(Path(str(value)))
    return paths


def decide_output_kind(flag: str, model, clean: ImageSet, mean, std, device, reporter: Reporter) -> OutputKind:
    """What the model returns, from a few clean tuning images normalised as it expects (or --output-kind).
    The probe runs in fp32 whatever --precision says: bf16 rounds a softmax's rows to sums off by
    ~0.002, and the probe would then call probabilities logits (and pick the wrong loss)."""
    batch = normalize(clean.x[:PROBE_IMAGES].to(device), mean, std)
    with autocast(device, "fp32"):
        probe = probe_outputs(model, batch)
    found = resolve_output_kind(parse_output_kind(flag), probe)
    reporter.info(f"model output: {found.kind} ({found.decided_by}); tuning loss: {found.adapter.describe()}")
    if found.warning:
        reporter.warn(found.warning)
    return found


def probed_adapter(model, clean: ImageSet, mean, std, device, reporter) -> LossAdapter:
    """The loss the retuning uses, from what the model returns (decided as purify decides it)."""
    return decide_output_kind("auto", model, clean, mean, std, device, reporter).adapter


SCHEMA_CHECKPOINT = "bdclean.checkpoint/1"


def base_metadata(arch, num_classes, in_channels, head, mean, std, bundle: DatasetBundle) -> dict:
    h, w, _ = bundle.test.image_shape
    return {
        "schema": SCHEMA_CHECKPOINT,
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": [h, w],
        "head": head,
        "normalization": {"mean": list(mean), "std": list(std)},
        "dataset": bundle.name,
    }


def subject_metadata(subject: Subject, bundle: DatasetBundle) -> dict:
    """The metadata that lets a written copy of `subject` load with no flags: its architecture (and the
    file that built it), classes, head, normalisation, input size, and for a hub model its configuration."""
    from ..models import hub

    meta = base_metadata(
        subject.arch, subject.num_classes, subject.in_channels, subject.head, subject.mean, subject.std, bundle
    )
    if subject.arch_source:
        meta["arch_source"] = subject.arch_source  # which file and factory built it (see subject._arch_notes)
    if subject.hub is not None:  # what rebuilds the model from the .safetensors alone
        meta[hub.METADATA_KEY] = subject.hub.to_metadata()
    return meta


def replayable_metrics(result) -> dict:
    """Metrics for embedding in weights: no wall-clock times, so a replay with the same seed gives a
    byte-identical file that can be checked by its sha256."""
    return {k: v for k, v in result.to_dict().items() if k != "seconds"}
