"""The model under audit: checkpoint + architecture + head + normalisation, resolved once.

Every command starts here. Each fact comes from the first source that has it:
flags > bdclean metadata embedded in the checkpoint > what the weights themselves show > the
dataset's standard values. Whatever was picked is recorded, so a report says where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, read_checkpoint
from .data.datasets import DatasetBundle
from .errors import ConfigError, InputError
from .models import (
    ARCHITECTURES,
    arch_file_source,
    build_model,
    find_head,
    guess_architecture,
    is_file_arch,
    load_strict,
    read_shape_facts,
)
from .models.hub import METADATA_KEY as HUB_METADATA_KEY
from .models.hub import build_hub_model, num_classes_of
from .models.hub_config import HubModel, check_input_shape, hub_from_metadata, input_spec, read_model_dir


@dataclass
class Subject:
    """A loaded model and everything needed to feed it."""

    checkpoint: Checkpoint
    model: torch.nn.Module
    arch: str
    num_classes: int
    in_channels: int
    head: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sources: dict[str, str] = field(default_factory=dict)  # fact -> where it came from
    arch_source: dict | None = None  # for a user's file architecture: file name, factory, sha256
    notes: list[str] = field(default_factory=list)  # warnings for the user (e.g. a changed arch file)
    hub: HubModel | None = None  # set for Hugging Face / timm models (models/hub.py)

    def describe(self) -> dict:
        ckpt = self.checkpoint
        return {
            "path": str(ckpt.path),
            "sha256": ckpt.sha256,
            "format": ckpt.format,
            "bytes": ckpt.size_bytes,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "head": self.head,
            "parameters": ckpt.num_parameters,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "resolved_from": dict(self.sources),
            **({"arch_source": dict(self.arch_source)} if self.arch_source else {}),
            **({"hub": self.hub.describe()} if self.hub is not None else {}),
        }


def _pick(sources: dict, name: str, *candidates):
    for origin, value in candidates:
        if value is not None:
            sources[name] = origin
            return value
    return None


def load_subject(
    path: str,
    bundle: DatasetBundle,
    arch: str | None = None,
    num_classes: int | None = None,
    head: str | None = None,
    mean=None,
    std=None,
    checkpoint: Checkpoint | None = None,
) -> Subject:
    """Read the checkpoint, build its architecture, load strictly, find the head, fix normalisation."""
    ckpt = checkpoint or (None if Path(path).is_dir() else read_checkpoint(path))
    if ckpt is None or HUB_METADATA_KEY in ckpt.metadata:  # a Hugging Face/timm directory, or bdclean's purified copy
        return load_hub_subject(path, bundle, ckpt, arch=arch, num_classes=num_classes, head=head, mean=mean, std=std)
    meta = trusted_metadata(ckpt, arch_flag=arch)
    notes = _arch_notes(ckpt, arch)
    sources: dict[str, str] = {}
    image_h, image_w, image_c = bundle.test.image_shape
    guess = guess_architecture(ckpt.state_dict) if arch is None and meta.get("arch") is None else None
    arch = _pick(
        sources, "arch", ("flag", arch), ("metadata", meta.get("arch")), ("weights", guess.arch if guess else None)
    )
    if arch is None:
        raise InputError(
            f"cannot tell the architecture of {ckpt.path} (no bdclean metadata, no built-in architecture matches its keys)",
            hint=f"pass --arch: one of {', '.join(ARCHITECTURES)}, torchvision:NAME, or path/to/file.py:factory",
        )
    # Sizes come from the architecture's own head and stem key names, never from the file's order.
    # The model is built once, at the sizes it must have to pass the checks below (the data's channels,
    # the flag's/metadata's/data's classes), and that same instance is loaded: no second build, and no
    # meta-device build (its initialisers import torch._dynamo: seconds of start-up).
    placeholder_classes = num_classes or meta.get("num_classes") or bundle.num_classes
    model = build_model(arch, placeholder_classes, image_c)
    facts = read_shape_facts(
        arch,
        ckpt.state_dict,
        (image_c, image_h, image_w),
        placeholder_classes=placeholder_classes,
        head=head or meta.get("head"),
        model=model,
    )
    n_classes = _pick(
        sources,
        "num_classes",
        ("flag", num_classes),
        ("metadata", meta.get("num_classes")),
        ("weights", facts.num_classes),
        ("data", bundle.num_classes),
    )
    in_channels = _pick(
        sources, "in_channels", ("metadata", meta.get("in_channels")), ("weights", facts.in_channels), ("data", image_c)
    )
    if in_channels != image_c:
        raise InputError(
            f"the model takes {in_channels}-channel images but the data has {image_c} channel(s)"
            + _origin(sources["in_channels"], facts.stem),
            hint="check --data: the checkpoint and the dataset do not belong together",
        )
    if n_classes != bundle.num_classes:
        raise InputError(
            f"the model has {n_classes} classes but the data has {bundle.num_classes}"
            + _origin(sources["num_classes"], facts.head),
            hint="check --data, or --num-classes if the checkpoint's class count was misread",
        )
    if (n_classes, in_channels) != (placeholder_classes, image_c):  # not reached after the checks above
        model = build_model(arch, n_classes, in_channels)
    load_strict(model, ckpt.state_dict)
    # facts.head is the last nn.Linear of the forward pass read_shape_facts already ran: find_head
    # then only checks it (no second pass).
    head_name = find_head(model, head or meta.get("head") or facts.head, input_shape=(image_c, image_h, image_w))
    sources["head"] = "flag" if head else ("metadata" if meta.get("head") else "forward order")
    norm_meta = meta.get("normalization") or {}
    mean = _pick(sources, "mean", ("flag", mean), ("metadata", norm_meta.get("mean")), ("dataset", bundle.mean))
    std = _pick(sources, "std", ("flag", std), ("metadata", norm_meta.get("std")), ("dataset", bundle.std))
    mean, std = validate_normalization(mean, std, image_c)
    notes = notes + guessed_notes(ckpt.path.name, arch, sources, mean, std)
    return Subject(
        ckpt,
        model,
        arch,
        int(n_classes),
        int(in_channels),
        head_name,
        mean,
        std,
        sources,
        arch_source=arch_file_source(arch),
        notes=notes,
    )


def load_hub_subject(
    path: str,
    bundle,
    checkpoint: Checkpoint | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    head: str | None = None,
    mean=None,
    std=None,
):
    """load_subject for a model directory (checkpoint None) or a checkpoint whose metadata carries its config."""
    hub = read_model_dir(path) if checkpoint is None else hub_from_metadata(checkpoint)
    if arch is not None:
        raise ConfigError(f"--arch does not apply to {path}: its architecture is read from its {hub.source}")
    ckpt = checkpoint or read_checkpoint(hub.weights)
    spec = input_spec(hub)
    image_h, image_w, image_c = bundle.test.image_shape
    check_input_shape(spec, bundle.test.image_shape)
    model = build_hub_model(hub, max_parameters=ckpt.num_parameters)
    n_classes = num_classes_of(model, hub)
    if num_classes is not None and num_classes != n_classes:
        raise InputError(f"--num-classes {num_classes} contradicts {hub.source}, which has {n_classes} classes")
    if n_classes != bundle.num_classes:
        raise InputError(
            f"the model has {n_classes} classes but the data has {bundle.num_classes}",
            hint="check --data: the model and the dataset do not belong together",
        )
    load_strict(model, ckpt.state_dict)
    head_name = find_head(model, head, input_shape=(image_c, image_h, image_w))
    sources = {
        "arch": hub.source,
        "num_classes": hub.source,
        "in_channels": hub.source,
        "head": "flag" if head else "forward order",
    }
    mean = _pick(sources, "mean", ("flag", mean), (spec.norm_source, spec.mean), ("dataset", bundle.mean))
    std = _pick(sources, "std", ("flag", std), (spec.norm_source, spec.std), ("dataset", bundle.std))
    mean, std = validate_normalization(mean, std, image_c)
    return Subject(ckpt, model, f"{hub.library}:{hub.arch}", n_classes, image_c, head_name, mean, std, sources, hub=hub)


def _origin(source: str, module: str | None) -> str:
    if source == "weights" and module:
        return f" (from the checkpoint's {module}.weight)"
    return {"metadata": " (from the checkpoint's bdclean metadata)", "flag": " (from --num-classes)"}.get(source, "")


def guessed_notes(name: str, arch: str, sources: dict[str, str], mean, std) -> list[str]:
    """One line per value that was guessed rather than given or recorded: a wrong guess changes every
    figure without an error, so the terminal says so, not only report.json's `resolved_from`."""
    notes = []
    if sources.get("arch") == "weights":
        notes.append(f"{name}: architecture {arch} guessed from its tensor names (no --arch, no bdclean metadata)")
    if sources.get("mean") == "dataset" or sources.get("std") == "dataset":
        values = ", ".join(f"{v:g}" for v in mean) + " / " + ", ".join(f"{v:g}" for v in std)
        notes.append(
            f"{name}: normalisation is the dataset's default (mean / std {values}), not recorded in the "
            "checkpoint; pass --mean/--std if it was trained with other values"
        )
    return notes


def _arch_notes(ckpt: Checkpoint, arch_flag: str | None) -> list[str]:
    """A warning when the user's --arch file is not the file that built the checkpoint (by sha256)."""
    recorded = ckpt.metadata.get("arch_source")
    if not arch_flag or not isinstance(recorded, dict) or not is_file_arch(arch_flag):
        return []
    current = arch_file_source(arch_flag) or {}
    notes = []
    if isinstance(recorded.get("sha256"), str) and current.get("sha256") and current["sha256"] != recorded["sha256"]:
        notes.append(
            f"--arch {arch_flag}: this file differs from the one that built {ckpt.path.name} "
            f"(sha256 {current['sha256'][:12]} vs recorded {recorded['sha256'][:12]}); "
            "the weights still loaded strictly, but check that the code computes the same thing"
        )
    if (
        isinstance(recorded.get("factory"), str)
        and current.get("factory")
        and current["factory"] != recorded["factory"]
    ):
        notes.append(
            f"--arch {arch_flag}: the checkpoint was built by the factory {recorded['factory'][:60]!r}, "
            f"not {current['factory']!r}"
        )
    return notes


def _arch_flag_hint(arch: str, source) -> str:
    if is_file_arch(arch):
        hint = f"if you trust that file, pass --arch {arch}"
        if isinstance(source, dict) and isinstance(source.get("sha256"), str):
            hint += f" (the file that built it had sha256 {source['sha256'][:64]})"
        return hint
    return "pass --arch yourself (a built-in name, torchvision:NAME or path/to/file.py:factory)"


def trusted_metadata(ckpt: Checkpoint, arch_flag: str | None = None) -> dict:
    """The embedded metadata fields bdclean acts on, type- and range-checked.

    The metadata comes from the same untrusted file as the weights, so it may only select among
    built-in behaviour: an `arch` naming a Python file would make opening a checkpoint run code
    of the checkpoint author's choosing, so only registered and torchvision names are honoured.
    When the user names the architecture on the command line (`arch_flag`), their word wins: the
    file's `arch` is not acted on, and the rest of the metadata (classes, head, normalisation,
    trigger) still applies.
    """
    meta = dict(ckpt.metadata)
    where = f"{ckpt.path}: embedded metadata"
    arch = meta.get("arch")
    if arch is not None:
        if not isinstance(arch, str):
            raise InputError(f"{where}: 'arch' must be a string, got {type(arch).__name__}")
        if arch_flag is not None:
            meta.pop("arch")
        elif arch not in ARCHITECTURES and not arch.startswith("torchvision:"):
            raise InputError(
                f"{where} names the architecture {arch[:200]!r}, which is not built in; bdclean will not "
                "run code named by a checkpoint",
                hint=_arch_flag_hint(arch, meta.get("arch_source")),
            )
    for key, lo, hi in (("num_classes", 2, 100_000), ("in_channels", 1, 4)):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi):
            raise InputError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {str(value)[:40]}")
    head = meta.get("head")
    if head is not None and not isinstance(head, str):
        raise InputError(f"{where}: 'head' must be a module name, got {type(head).__name__}")
    norm = meta.get("normalization")
    if norm is not None:
        if not isinstance(norm, dict):
            raise InputError(f"{where}: 'normalization' must be a mapping with mean and std")
        for key in ("mean", "std"):
            values = norm.get(key)
            if values is not None and (
                not isinstance(values, list)
                or not values
                or len(values) > 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            ):
                raise InputError(
                    f"{where}: normalization {key} must be a list of 1-4 finite numbers, got {str(values)[:60]}"
                )
    return meta


def validate_normalization(mean, std, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and channels > 1:
        mean = mean * channels
    if len(std) == 1 and channels > 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise InputError(
            f"normalisation needs {channels} value(s) per statistic, got mean {list(mean)} std {list(std)}"
        )
    if not all(math.isfinite(v) for v in mean + std):
        raise InputError(f"normalisation values must be finite numbers, got mean {list(mean)} std {list(std)}")
    if any(s <= 0 for s in std):
        raise InputError(f"--std values must be > 0, got {list(std)}")
    return mean, std


def normalization_tensors(subject: Subject, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(subject.mean), 1, 1)
    mean = torch.tensor(subject.mean, dtype=torch.float32, device=device).view(shape)
    std = torch.tensor(subject.std, dtype=torch.float32, device=device).view(shape)
    return mean, std


def export_weights(model: torch.nn.Module, subject: Subject) -> dict[str, torch.Tensor]:
    """The model's weights under the input checkpoint's own keys, shapes and dtypes (nothing added or
    dropped), on the CPU: what bdclean writes, so the file loads wherever the input did."""
    current = model.state_dict()
    return {
        key: current[key].detach().to("cpu", original.dtype) for key, original in subject.checkpoint.state_dict.items()
    }
