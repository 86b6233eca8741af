"""--clean-reference: which clean model of the task a run compares with, and loading it.

Values: a checkpoint path; `bundled` (bdclean's own clean model for the data's built-in dataset,
models/bundled_references.py) or `bundled:NAME` (that dataset's, for data of another name, e.g. a
user's own held-out CIFAR-10 images); `none` (no reference, not even the bundled one). Left unset, a
scan (the default purify's, `bdclean scan`) uses the bundled reference of the data's built-in dataset,
and on data of another name tries the bundled one that takes its image shape and class count: the
reference's accuracy on the labelled clean images then decides whether it is used (scanning/guided.py,
TRIED_FLOOR), so a folder of CIFAR-10 images is recognised by evidence and a folder of other 32x32 images
in 10 classes is not taken for CIFAR-10. Either way the run says so; the retuning check uses a reference
only where one is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import read_checkpoint
from ..config import EvaluateOptions
from ..data.datasets import DatasetBundle
from ..errors import BdcleanError, ConfigError, InputError, UnsafeInputError
from ..models.bundled_references import BUNDLED_REFERENCES, BundledReference, bundled_reference
from ..progress import Reporter
from ..runtime import prepare_model
from ..scanning.guided import TRIED_FLOOR, CleanReference
from ..subject import Subject, load_subject, normalization_tensors
from .setup import open_subject

NONE = "none"
BUNDLED = "bundled"


@dataclass(frozen=True)
class ReferenceChoice:
    """A resolved --clean-reference: the file to load and the name reports give it."""

    path: Path
    label: str  # the path as given, or bundled:NAME
    bundled: BundledReference | None = None
    tried: bool = False  # bundled, on data of another name: used only where its accuracy there shows the task


def reference_named(value: str | None) -> bool:
    """Whether --clean-reference names a reference (unset and `none` do not)."""
    return bool(value) and value.strip().lower() != NONE


def resolve_reference(value: str | None, bundle: DatasetBundle, num_classes: int, model=None) -> ReferenceChoice | None:
    """The reference `value` names for this data, or None (unset or `none`); for `bundled`, the one chosen for
    `model` (models/bundled_references.py). `bundled` that does not fit the data is refused by name: a
    reference of another task would read every trigger as planted."""
    if not reference_named(value):
        return None
    if value.strip().lower().split(":")[0] != BUNDLED:
        return ReferenceChoice(Path(value), value)
    name = value.split(":", 1)[1].strip().lower() if ":" in value else bundle.name
    ref = bundled_reference(name, model)
    shipped = ", ".join(BUNDLED_REFERENCES)
    if ref is None:
        raise ConfigError(
            f"--clean-reference {value}: bdclean ships no clean reference for '{name}'",
            hint=f"bundled references: {shipped} (`--clean-reference bundled:NAME` for data of another name); "
            "otherwise give a clean model of the same task",
        )
    if not ref.fits(bundle.test.image_shape, num_classes):
        raise ConfigError(
            f"--clean-reference {value}: the bundled {ref.dataset} reference takes {ref.num_classes}-class "
            f"{'x'.join(map(str, ref.image_shape))} images; these are {num_classes}-class "
            f"{'x'.join(map(str, bundle.test.image_shape))}",
            hint="give a clean model of this task, or --clean-reference none",
        )
    return ReferenceChoice(ref.path, ref.label, ref)


def automatic_reference(bundle: DatasetBundle, num_classes: int, model=None) -> ReferenceChoice | None:
    """The bundled reference a scan uses when --clean-reference is unset: the data's built-in dataset's (the one
    chosen for `model`), if it fits the images and classes; else None."""
    ref = bundled_reference(bundle.name, model)
    if ref is None or not ref.fits(bundle.test.image_shape, num_classes):
        return None
    return ReferenceChoice(ref.path, ref.label, ref)


def bundled_fit(bundle: DatasetBundle, num_classes: int) -> str | None:
    """The built-in dataset whose bundled reference takes images and classes of this shape, or None."""
    for dataset, shipped in BUNDLED_REFERENCES.items():
        if any(ref.fits(bundle.test.image_shape, num_classes) for ref in shipped):
            return dataset
    return None


def tried_reference(bundle: DatasetBundle, num_classes: int, model=None) -> ReferenceChoice | None:
    """For data that is not a built-in dataset: the bundled reference that takes images and classes of its shape
    (the one chosen for `model`), to be tried; None when none does."""
    dataset = bundled_fit(bundle, num_classes)
    ref = bundled_reference(dataset, model) if dataset is not None else None
    if ref is None:
        return None
    return ReferenceChoice(ref.path, ref.label, ref, tried=True)


def open_reference(
    opts: EvaluateOptions, bundle: DatasetBundle, reporter: Reporter, choice: ReferenceChoice | None = None
) -> Subject:
    """Load the clean reference (`choice`, else the one --clean-reference names). A reference that records its
    own architecture (a bdclean .safetensors: trained, purified or converted by `bdclean convert`) is loaded
    from that record alone, so it may be of another architecture than the model; any other is loaded with
    the model's own --arch/--num-classes/--head/--mean/--std. A load that fails says so: the usual hint
    (change --arch) would break the model's own load."""
    choice = choice or resolve_reference(opts.clean_reference, bundle, bundle.num_classes)
    path = choice.path
    try:
        recorded = None if path.is_dir() else read_checkpoint(path)
        if choice.bundled is not None and (recorded is None or recorded.sha256 != choice.bundled.sha256):
            raise InputError(
                f"the bundled clean reference {path} is not the file bdclean shipped (sha256 differs)",
                hint="reinstall bdclean, or pass --clean-reference PATH / none",
            )
        if recorded is not None and recorded.metadata.get("arch"):
            reporter.stage(f"loading checkpoint {path} (its recorded architecture and normalisation)")
            reference = load_subject(str(path), bundle, checkpoint=recorded)
            for note in reference.notes:
                reporter.warn(note)
            return reference
        return open_subject(opts, str(path), bundle, reporter, read=recorded)
    except UnsafeInputError:
        raise
    except BdcleanError as exc:
        raise type(exc)(
            f"--clean-reference {choice.label}: {exc.message}",
            hint="the clean reference must be a clean model of the same task (the same classes). Without bdclean "
            "metadata it is loaded with the same --arch, --num-classes, --head, --mean and --std as the model: "
            "give a clean model of the same architecture, or write it once with `bdclean convert REFERENCE --data "
            "... --arch ... --mean ... --std ...`, which records its own",
        ) from None


def open_clean_reference(opts, bundle: DatasetBundle, subject: Subject, device, reporter: Reporter):
    """The clean reference for the scan's shortcut test, on the run's device in eval mode, or None: the one
    --clean-reference names, else the bundled one that fits the data (announced), else None."""
    choice = resolve_reference(opts.clean_reference, bundle, subject.num_classes, subject.model)
    if choice is None and opts.clean_reference is None:
        choice = automatic_reference(bundle, subject.num_classes, subject.model)
        if choice is not None:
            reporter.info(
                f"clean reference for the scan's shortcut test: {choice.bundled.description}, bundled, of another "
                "architecture than the model's, so not its parent (--clean-reference none goes without)"
            )
        elif (choice := tried_reference(bundle, subject.num_classes, subject.model)) is not None:
            dataset = choice.bundled.dataset
            reporter.info(
                f"these images are not the built-in {dataset}, but of its shape and class count: the scan's shortcut "
                f"test tries {choice.bundled.description}, and uses it only if it gets at least {TRIED_FLOOR:.0%} of "
                "the held-out images' labels right and about as many as the model (if so, they are "
                f"{dataset}'s classes; --clean-reference bundled:{dataset} uses it outright, none goes without)"
            )
    if choice is None:
        return None
    reporter.stage(f"loading the clean reference {choice.label}")
    reference = open_reference(opts, bundle, reporter, choice)
    if reference.num_classes != subject.num_classes:
        raise ConfigError(
            f"--clean-reference has {reference.num_classes} classes, the model {subject.num_classes}",
            hint="the clean reference must be a clean model of the same task",
        )
    mean, std = normalization_tensors(reference, device)
    floor = TRIED_FLOOR if choice.tried else 0.0
    return CleanReference(choice.label, prepare_model(reference.model, device).eval(), mean, std, floor=floor)


def check_reference_use(opts, scans: bool = False) -> None:
    """--clean-reference acts in the retuning check and, for a purify that scans, in telling natural
    shortcuts from planted triggers; anywhere else it would be ignored, so it is refused by name."""
    if (
        reference_named(getattr(opts, "clean_reference", None))
        and not getattr(opts, "retune_check", False)
        and not scans
    ):
        raise ConfigError(
            "--clean-reference is used by --retune-check"
            + (" and by the default purify's scan" if hasattr(opts, "method") else "")
            + ", and neither runs here",
            hint="add --retune-check, or drop --clean-reference",
        )
