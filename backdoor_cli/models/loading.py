"""Strict weight loading with a readable diff of missing, unexpected and wrongly-shaped keys."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .building import first_line
from .head import preview_names


def is_counter(key: str) -> bool:
    # BatchNorm's num_batches_tracked only matters for momentum=None running averages, never for
    # inference or for our fine-tuning (momentum is set); checkpoints from PyTorch < 0.4.1 (and code
    # that filters buffers) lack it, so it is ignored whether missing or extra.
    return key.endswith("num_batches_tracked")


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every weight or fail with InputError listing missing, unexpected and wrongly-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not is_counter(k)]
    unexpected = [k for k in state_dict if k not in expected and not is_counter(k)]
    reshaped, wrong_kind, ready = [], [], {}
    for key, value in state_dict.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            wrong_kind.append(f"{key} (a {type(value).__name__}, not a tensor)")
            continue
        target = expected[key]
        if is_counter(key) and (value.shape != target.shape or value.is_floating_point() or value.is_complex()):
            continue  # a malformed counter is harmless (see is_counter); keep the model's own
        if tuple(value.shape) != tuple(target.shape):
            reshaped.append(f"{key}: model {_shape(target)} vs checkpoint {_shape(value)}")
        elif target.is_floating_point() != value.is_floating_point() or value.is_complex():
            # Integer or bool values where real-valued weights belong are a broken or hostile file,
            # not something to cast silently.
            wrong_kind.append(
                f"{key} ({str(value.dtype).replace('torch.', '')} where the model has "
                f"{str(target.dtype).replace('torch.', '')})"
            )
        else:
            ready[key] = value.to(target.dtype)  # e.g. fp16/bf16 checkpoints into an fp32 model
    if missing or unexpected or reshaped or wrong_kind:
        parts = [
            f"{label} {len(keys)}: {preview_names(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", reshaped),
                ("wrong dtype", wrong_kind),
            )
            if keys
        ]
        raise InputError(
            "checkpoint does not fit the model: " + "; ".join(parts),
            hint="wrong --arch or --num-classes? `bdclean inspect CHECKPOINT` lists its keys and shapes",
        )
    try:
        result = model.load_state_dict(ready, strict=False)
    except RuntimeError as exc:  # checked above, so this is unexpected; still an input problem
        raise InputError(f"checkpoint does not fit the model: {first_line(exc)}") from None
    left = [k for k in result.missing_keys if not is_counter(k)]
    if left or result.unexpected_keys:
        raise InputError(
            f"checkpoint does not fit the model: missing {preview_names(left)}, "
            f"unexpected {preview_names(list(result.unexpected_keys))}"
        )


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"
