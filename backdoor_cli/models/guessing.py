"""What a state_dict's keys and shapes reveal about the model that made it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ARCHITECTURES
from .loading import is_counter


@dataclass
class ArchGuess:
    """What a state_dict's keys and shapes reveal. `arch` is None unless a built-in matches exactly."""

    arch: str | None
    num_classes: int | None
    in_channels: int | None
    head: str | None


# Sanity bounds for sizes read from an untrusted file before any model is built from them.
_MAX_CLASSES = 1_000_000
_MAX_CHANNELS = 4096


def guess_architecture(state_dict: dict[str, torch.Tensor]) -> ArchGuess:
    """Name the built-in architecture whose keys and shapes match exactly, plus the class count,
    input channels and head that the weights show. Builds nothing real: candidates are made on the
    meta device (shapes only, no memory, no initialisation)."""
    shapes = {
        k: tuple(v.shape)
        for k, v in state_dict.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and not is_counter(k)
    }
    head, num_classes = _guess_head(shapes)
    in_channels = _guess_in_channels(shapes)
    for name, builder in ARCHITECTURES.items():
        found = _match(builder, shapes)
        if found is not None:
            return ArchGuess(name, *found)
    return ArchGuess(None, num_classes, in_channels, head)


# Without an architecture, nothing may depend on the order of tensors in the file (safetensors
# sorts them; other writers shuffle): the rules below look only at names and shapes.
_HEAD_NAMES = ("fc", "classifier", "head", "linear", "last_linear", "logits", "out", "output", "predictions")


def _guess_head(shapes: dict[str, tuple]) -> tuple[str | None, int | None]:
    """Among 2-D `.weight`s, those whose output size feeds no other 2-D weight (the ends of the
    Linear chains); of those, one named like a head, then the shallowest path, then by name."""
    linears = {
        k[: -len(".weight")]: s
        for k, s in shapes.items()
        if k.endswith(".weight") and len(s) == 2 and _sane(s[0], _MAX_CLASSES) and s[1] >= 1
    }
    if not linears:
        return None, None
    ends = [n for n, s in linears.items() if all(other[1] != s[0] for m, other in linears.items() if m != n)] or list(
        linears
    )
    best = min(ends, key=lambda n: (n.rsplit(".", 1)[-1] not in _HEAD_NAMES, n.count("."), n))
    return best, linears[best][0]


def _guess_in_channels(shapes: dict[str, tuple]) -> int | None:
    """The input channels of the convolution no other convolution feeds: of the 4-D weights whose
    input size is no 4-D weight's output size, the shallowest path (then by name)."""
    convs = {k: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4}
    outputs = {s[0] for s in convs.values()}
    starts = [k for k, s in convs.items() if s[1] not in outputs] or list(convs)
    if not starts:
        return None
    best = min(starts, key=lambda k: (k.count("."), k))
    channels = convs[best][1]
    return channels if _sane(channels, _MAX_CHANNELS) else None


def _sane(value, upper: int) -> bool:
    return isinstance(value, int) and 1 <= value <= upper


def _match(builder: Callable[..., nn.Module], shapes: dict[str, tuple]) -> tuple[int, int, str] | None:
    """(num_classes, in_channels, head) if the builder's model has exactly these keys and shapes."""
    try:
        with torch.device("meta"):
            reference = builder(2, 3)
    except Exception:  # noqa: BLE001 - a builder that cannot go on meta just cannot be guessed
        return None
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not is_counter(k)}
    if set(ref) != set(shapes):
        return None
    head = next((n for n, m in reversed(list(reference.named_modules())) if isinstance(m, nn.Linear)), None)
    stem = next((k for k, s in ref.items() if len(s) == 4), None)
    if head is None or stem is None:
        return None
    num_classes, in_channels = shapes[f"{head}.weight"][0], shapes[stem][1]
    if not (_sane(num_classes, _MAX_CLASSES) and _sane(in_channels, _MAX_CHANNELS)):
        return None
    with torch.device("meta"):
        candidate = builder(num_classes, in_channels)
    got = {k: tuple(v.shape) for k, v in candidate.state_dict().items() if not is_counter(k)}
    return (num_classes, in_channels, head) if got == shapes else None
