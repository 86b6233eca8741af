"""What a state_dict's keys and shapes reveal about the model that made it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import ARCHITECTURES
from .loading import _is_counter

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
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()
              if isinstance(k, str) and isinstance(v, torch.Tensor) and not _is_counter(k)}
    head, num_classes = _guess_head(shapes)
    in_channels = next((s[1] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4), None)
    for name, builder in ARCHITECTURES.items():
        found = _match(builder, shapes)
        if found is not None:
            return ArchGuess(name, *found)
    return ArchGuess(None, num_classes, in_channels if _sane(in_channels, _MAX_CHANNELS) else None, head)


def _guess_head(shapes: dict[str, tuple]) -> tuple[str | None, int | None]:
    """The last 2-D `.weight` (state_dict order follows module registration, usually forward order)."""
    for key in reversed(list(shapes)):
        shape = shapes[key]
        if key.endswith(".weight") and len(shape) == 2 and _sane(shape[0], _MAX_CLASSES):
            return key[: -len(".weight")], shape[0]
    return None, None


def _sane(value, upper: int) -> bool:
    return isinstance(value, int) and 1 <= value <= upper


def _match(builder: Callable[..., nn.Module], shapes: dict[str, tuple]) -> tuple[int, int, str] | None:
    """(num_classes, in_channels, head) if the builder's model has exactly these keys and shapes."""
    try:
        with torch.device("meta"):
            reference = builder(2, 3)
    except Exception:  # noqa: BLE001 - a builder that cannot go on meta just cannot be guessed
        return None
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not _is_counter(k)}
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
    got = {k: tuple(v.shape) for k, v in candidate.state_dict().items() if not _is_counter(k)}
    return (num_classes, in_channels, head) if got == shapes else None
