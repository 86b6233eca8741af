"""Shape facts (class count, input channels) read from the architecture matched to the checkpoint.

A state_dict's order is not the model's: safetensors stores tensors in its own (sorted) order, and
other writers may shuffle them. So once the architecture is known, its head and its first
convolution are found in the *model* (forward order, on the meta device where possible), and the
checkpoint's tensors under those exact key names give the class count and input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ARCHITECTURES
from .building import build_model
from .head import modules_in_forward_order

_MAX_CLASSES = 1_000_000
_MAX_CHANNELS = 4096


@dataclass(frozen=True)
class ShapeFacts:
    """What the checkpoint's tensors say under the architecture's own head and stem key names."""

    num_classes: int | None
    in_channels: int | None
    head: str | None  # module path of the last nn.Linear in forward order
    stem: str | None  # module path of the first convolution in forward order


def read_shape_facts(
    arch: str,
    state_dict: dict[str, torch.Tensor],
    input_shape: tuple[int, int, int],
    placeholder_classes: int,
    head: str | None = None,
    model: nn.Module | None = None,
) -> ShapeFacts:
    """Build `arch` once with placeholder sizes (the key names do not depend on them), find its head
    and stem, and read the checkpoint's sizes under those names. `input_shape` is (C, H, W) of the data.
    Missing keys give None: strict loading then reports the real mismatch.

    `model`: `arch` already built at these placeholder sizes (subject.py builds the model it will load
    first and passes it here), so it is not built a second time."""
    reference = model if model is not None else _reference_model(arch, placeholder_classes, input_shape[0])
    modules = dict(reference.named_modules())
    if arch in ARCHITECTURES:
        # The built-ins define their modules in forward order (tests/test_models.py checks it), so no
        # forward pass is needed: on a GPU run it would be a CPU forward pass, done only for this.
        order = list(modules)
    else:
        order = modules_in_forward_order(reference, input_shape) or list(modules)  # definition order as fallback
    head = head or next((n for n in reversed(order) if isinstance(modules.get(n), nn.Linear)), None)
    stem = next((n for n in order if isinstance(modules.get(n), nn.modules.conv._ConvNd)), None)
    return ShapeFacts(
        _classes_under(state_dict, head), _channels_under(state_dict, stem, modules.get(stem)), head, stem
    )


def _reference_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    # The meta device builds shapes only (no memory, no initialisation); a factory that cannot run
    # there (data-dependent code) is built normally, once more, at these small placeholder sizes.
    # Note: initialising parameters on the meta device goes through torch's Python reference kernels,
    # whose first call imports torch._dynamo (and sympy): seconds of start-up. load_subject avoids
    # this path by passing the model it builds anyway.
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes, in_channels)
    except Exception:  # noqa: BLE001 - any meta failure: retry for real (real errors surface there)
        return build_model(arch, num_classes, in_channels)


def _classes_under(state_dict: dict, head: str | None) -> int | None:
    weight = state_dict.get(f"{head}.weight") if head else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return _sane(weight.shape[0], _MAX_CLASSES)


def _channels_under(state_dict: dict, stem: str | None, module: nn.Module | None) -> int | None:
    weight = state_dict.get(f"{stem}.weight") if stem else None
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        return None
    # A (rare) grouped stem stores in_channels / groups per filter; transposed convs store in first.
    groups = getattr(module, "groups", 1) or 1
    transposed = bool(getattr(module, "transposed", False))
    return _sane(int(weight.shape[0 if transposed else 1]) * (1 if transposed else groups), _MAX_CHANNELS)


def _sane(value: int, upper: int) -> int | None:
    value = int(value)
    return value if 1 <= value <= upper else None
