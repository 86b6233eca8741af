"""Finding the classifier head: the last nn.Linear a forward pass reaches."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def find_head(model: nn.Module, name: str | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> str:
    """The module path of the classifier head: `name` if given (it must be an nn.Linear), else the
    last nn.Linear reached in a forward pass on a zero batch."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if name is not None:
        module = dict(model.named_modules()).get(name)
        if module is None:
            raise InputError(
                f"head {name!r} (--head) is not a module of this model",
                hint=f"Linear layers in the model: {preview_names(linears) or 'none'}",
            )
        if not isinstance(module, nn.Linear):
            raise InputError(
                f"head {name!r} (--head) is a {type(module).__name__}, not an nn.Linear",
                hint=f"Linear layers in the model: {preview_names(linears) or 'none'}",
            )
        return name
    if not linears:
        raise InputError(
            "the model has no nn.Linear layer to use as the classifier head",
            hint="defenses re-train a Linear head; use an architecture whose classifier is nn.Linear",
        )
    called = _linears_in_forward_order(model, input_shape)
    # Forward order beats definition order (a model may define its head before its body); when the
    # dummy pass fails (unusual input handling), definition order is the best remaining guess.
    return called[-1] if called else linears[-1]


def _linears_in_forward_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in modules_in_forward_order(model, input_shape) if isinstance(modules[n], nn.Linear)]


def modules_in_forward_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the leaf modules in the order a forward pass on a zero batch calls them (a module
    called twice is listed twice); empty when the pass fails. Works on the meta device too."""
    called: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _i, n=n: called.append(n))
        for n, m in model.named_modules()
        if n and not any(True for _ in m.children())
    ]
    modes = {m: m.training for m in model.modules()}  # restored exactly, even when mixed
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - any failure falls back to definition order at the caller
        called.clear()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return called


def preview_names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
