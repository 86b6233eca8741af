"""Building a fresh model from a name: a built-in, `torchvision:NAME`, or the user's own file."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import operator
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import InputError
from .architectures import ARCHITECTURES


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A fresh model: a registry name, `torchvision:NAME`, or `path/to/file.py:factory`."""
    if not isinstance(arch, str) or not arch.strip():
        raise InputError(f"--arch must be a non-empty name, got {arch!r}", hint=_arch_hint())
    num_classes = _positive_int(num_classes, "number of classes")
    in_channels = _positive_int(in_channels, "number of input channels")
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](num_classes, in_channels)
    if arch.startswith("torchvision:"):
        return _build_torchvision(arch.split(":", 1)[1], num_classes, in_channels)
    file_part, sep, factory = arch.rpartition(":")
    if sep and file_part.endswith(".py"):
        return _build_from_file(Path(file_part), factory, num_classes, in_channels)
    if arch.endswith(".py"):
        raise InputError(
            f"--arch {arch} names a Python file but no factory function",
            hint=f"write it as {arch}:FUNCTION, e.g. {arch}:build",
        )
    raise InputError(f"unknown architecture {arch!r}", hint=_arch_hint())


def _positive_int(value, label: str) -> int:
    try:
        number = operator.index(value)  # ints and numpy/torch integers; not floats or strings
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise InputError(f"the {label} must be a positive integer, got {value!r}")
    return number


def _arch_hint() -> str:
    return f"use one of {', '.join(ARCHITECTURES)}, torchvision:NAME, or path/to/file.py:factory"


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if not name:
        raise InputError("--arch torchvision: needs a model name", hint="e.g. torchvision:resnet18")
    if in_channels != 3:
        raise InputError(
            f"torchvision:{name} takes 3-channel images, but {in_channels} channel(s) were asked for",
            hint="use a built-in architecture or your own file.py:factory for other channel counts",
        )
    try:  # torchvision wheels built for another torch fail at import with RuntimeError/OSError, not ImportError
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure means the same thing to the user
        raise InputError(
            f"torchvision is not usable here: {first_line(exc)}",
            hint="install a torchvision that matches your torch (pip install bdclean[vision]), "
            "or use a built-in architecture",
        ) from None
    try:
        return torchvision.models.get_model(name, num_classes=num_classes, weights=None)
    except Exception as exc:  # noqa: BLE001 - unknown name or bad argument, reported as input error
        try:
            known = ", ".join(sorted(torchvision.models.list_models())[:12]) + ", ..."
        except Exception:  # noqa: BLE001 - older torchvision has no list_models
            known = "resnet18, vgg16_bn, ..."
        raise InputError(
            f"torchvision cannot build {name!r}: {first_line(exc)}", hint=f"torchvision model names include {known}"
        ) from None


def _build_from_file(path: Path, factory: str, num_classes: int, in_channels: int) -> nn.Module:
    """Import the user's own file (their code, run at their request) and call its factory."""
    if not factory.isidentifier():
        raise InputError(
            f"--arch {path}:{factory}: {factory!r} is not a Python function name", hint=f"write it as {path}:FUNCTION"
        )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise InputError(f"architecture file {path} {what}", hint="check the path in --arch path/to/file.py:factory")
    # A unique module name per file path, so two user files called model.py do not collide.
    resolved = path.resolve()
    module_name = "bdclean_user_arch_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    try:
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(
            f"importing architecture file {path} failed: {type(exc).__name__}: {first_line(exc)}",
            hint=f"fix the file so it imports on its own (python -c 'import runpy; runpy.run_path(\"{path}\")')",
        ) from None
    fn = getattr(module, factory, None)
    if fn is None:
        found = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name
        )
        raise InputError(
            f"architecture file {path} has no function {factory!r}",
            hint=f"functions defined there: {', '.join(found) or 'none'}",
        )
    if not callable(fn):
        raise InputError(f"{factory!r} in architecture file {path} is not callable")
    kwargs: dict = {"num_classes": num_classes}
    if _accepts(fn, "in_channels"):
        kwargs["in_channels"] = in_channels
    try:
        model = fn(**kwargs)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(
            f"{factory}(num_classes={num_classes}) in architecture file {path} failed: "
            f"{type(exc).__name__}: {first_line(exc)}",
            hint="the factory must accept num_classes= (and optionally in_channels=)",
        ) from None
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{factory}() in architecture file {path} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def arch_file_source(arch: str) -> dict | None:
    """For `path.py:factory`: the factory name and the sha256 of the file's bytes, recorded in a
    purified checkpoint's metadata so a later run can tell whether the same code rebuilds it."""
    file_part, sep, factory = arch.rpartition(":")
    if not (sep and file_part.endswith(".py")):
        return None
    path = Path(file_part)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"file": path.name, "factory": factory, "sha256": digest}


def is_file_arch(arch: str) -> bool:
    file_part, sep, _factory = arch.rpartition(":")
    return bool(sep and file_part.endswith(".py")) or arch.endswith(".py")
