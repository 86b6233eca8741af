"""One forward pass to learn something about a model: in eval mode, with forward hooks attached for
exactly its length. Every module's training flag is restored and every hook removed afterwards, also
when the model raises, so probing never changes how the model trains next."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, object], None]


def probe_forward(model: nn.Module, batch: torch.Tensor, hooks: Iterable[tuple[nn.Module, Hook]]):
    """model(batch) under no_grad in eval mode, with each (module, hook) attached; returns the output."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
