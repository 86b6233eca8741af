"""Architectures by name, strict weight loading with a readable key diff, and head detection.

The built-in networks are written here from their published descriptions. Their state_dict key
names are chosen to match the checkpoints that backdoor research code saves, so those checkpoints
load strictly without any renaming:
- `resnet18`: the CIFAR ResNet-18 of the FST reference code (3x3 stem, no max-pool, head `linear`).
- `preactresnet18`: BackdoorBench's PreActResNet-18 (no final BN before pooling, head `linear`).
- `vgg16_bn`: the common CIFAR VGG-16 with BN (`features` + a single Linear `classifier`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

# ----------------------------------------------------------------------------- architectures


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # Keys shortcut.0 (conv) and shortcut.1 (bn), as in the published CIFAR checkpoints.
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep detail."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, planes = (64, 128, 256, 512), 64
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        # Adaptive pooling instead of the usual avg_pool2d(4): same result at 32x32, any size works.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): BN-ReLU before each conv; the shortcut is a bare
    1x1 conv applied to the pre-activated input when the shape changes (key shortcut.0)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """BackdoorBench's PreActResNet: stem conv only (no stem BN), and no final BN-ReLU before the
    pooling; reproducing that exactly is what makes its checkpoints load and behave the same."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        widths, planes = (64, 128, 256, 512), 64
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stage.append(PreActBlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """The common CIFAR VGG-BN: `features` = [Conv3x3(bias)-BN-ReLU]* with 2x2 max-pools (indices
    0, 1, 2 per conv block, one per pool, as in the widely used pytorch-cifar layout), global
    average pooling, and one Linear `classifier` (512 -> classes) instead of ImageNet's three.
    The pools use ceil_mode so inputs smaller than 32x32 (e.g. 28x28) still work; for power-of-two
    sizes ceil_mode changes nothing."""

    def __init__(self, layout: tuple, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: the BN right after it has its own shift.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SimpleCNN(nn.Module):
    """A small VGG-style net (5 convs, ~0.28M parameters) that trains on CIFAR-10 on a laptop CPU.

    Layout: conv32 | pool | conv64 conv64 | pool | conv128 conv128 | global avg pool | Linear `fc`.
    Pooling right after the first (narrow) conv keeps every wide conv at 1/4 or 1/16 of the pixels:
    on a 2-core CPU this was 2.2x faster per batch than pooling after a second full-resolution conv,
    and no less accurate in a short training run. Global pooling makes any input size work."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w), nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn_relu(w, 2 * w), _conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn_relu(2 * w, 4 * w), _conv_bn_relu(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyNet(nn.Module):
    """Minuscule (one 4-channel conv, BN, global pooling, Linear `fc`): for unit tests only."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-18 (FST reference code's key names)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


def preactresnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """BackdoorBench's PreActResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


def vgg16_bn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR VGG-16 with batch norm and a single Linear classifier."""
    return CifarVGG(VGG16_LAYOUT, num_classes, in_channels)


def simple_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Small fast CPU model for demos and experiments."""
    return SimpleCNN(num_classes, in_channels)


def simple_cnn_half(num_classes: int, in_channels: int = 3) -> nn.Module:
    """simple_cnn at half the channels (16-32-64, ~71k parameters): 3.3x faster per training step on a
    2-core CPU (112 ms against 371 ms per batch of 128), for experiment grids that must fit in an hour."""
    return SimpleCNN(num_classes, in_channels, width=16)


def test_tiny(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Minuscule model for unit tests."""
    return TinyNet(num_classes, in_channels)


test_tiny.__test__ = False  # not a pytest test, despite its name

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "preactresnet18": preactresnet18,
    "vgg16_bn": vgg16_bn,
    "simple_cnn": simple_cnn,
    "simple_cnn_half": simple_cnn_half,
    "test_tiny": test_tiny,
}

# ----------------------------------------------------------------------------- building


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
        raise InputError(f"--arch {arch} names a Python file but no factory function",
                         hint=f"write it as {arch}:FUNCTION, e.g. {arch}:build")
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
        raise InputError(f"torchvision:{name} takes 3-channel images, but {in_channels} channel(s) were asked for",
                         hint="use a built-in architecture or your own file.py:factory for other channel counts")
    try:  # torchvision wheels built for another torch fail at import with RuntimeError/OSError, not ImportError
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure means the same thing to the user
        raise InputError(f"torchvision is not usable here: {_first_line(exc)}",
                         hint="install a torchvision that matches your torch (pip install bdclean[vision]), "
                              "or use a built-in architecture") from None
    try:
        return torchvision.models.get_model(name, num_classes=num_classes, weights=None)
    except Exception as exc:  # noqa: BLE001 - unknown name or bad argument, reported as input error
        try:
            known = ", ".join(sorted(torchvision.models.list_models())[:12]) + ", ..."
        except Exception:  # noqa: BLE001 - older torchvision has no list_models
            known = "resnet18, vgg16_bn, ..."
        raise InputError(f"torchvision cannot build {name!r}: {_first_line(exc)}",
                         hint=f"torchvision model names include {known}") from None


def _build_from_file(path: Path, factory: str, num_classes: int, in_channels: int) -> nn.Module:
    """Import the user's own file (their code, run at their request) and call its factory."""
    if not factory.isidentifier():
        raise InputError(f"--arch {path}:{factory}: {factory!r} is not a Python function name",
                         hint=f"write it as {path}:FUNCTION")
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
        raise InputError(f"importing architecture file {path} failed: {type(exc).__name__}: {_first_line(exc)}",
                         hint="fix the file so it imports on its own (python -c 'import runpy; "
                              f"runpy.run_path(\"{path}\")')") from None
    fn = getattr(module, factory, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise InputError(f"architecture file {path} has no function {factory!r}",
                         hint=f"functions defined there: {', '.join(found) or 'none'}")
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
        raise InputError(f"{factory}(num_classes={num_classes}) in architecture file {path} failed: "
                         f"{type(exc).__name__}: {_first_line(exc)}",
                         hint="the factory must accept num_classes= (and optionally in_channels=)") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{factory}() in architecture file {path} returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- head


def find_head(model: nn.Module, name: str | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> str:
    """The module path of the classifier head: `name` if given (it must be an nn.Linear), else the
    last nn.Linear reached in a forward pass on a zero batch."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if name is not None:
        module = dict(model.named_modules()).get(name)
        if module is None:
            raise InputError(f"head {name!r} (--head) is not a module of this model",
                             hint=f"Linear layers in the model: {_preview(linears) or 'none'}")
        if not isinstance(module, nn.Linear):
            raise InputError(f"head {name!r} (--head) is a {type(module).__name__}, not an nn.Linear",
                             hint=f"Linear layers in the model: {_preview(linears) or 'none'}")
        return name
    if not linears:
        raise InputError("the model has no nn.Linear layer to use as the classifier head",
                         hint="defenses re-train a Linear head; use an architecture whose classifier is nn.Linear")
    called = _linears_in_forward_order(model, input_shape)
    # Forward order beats definition order (a model may define its head before its body); when the
    # dummy pass fails (unusual input handling), definition order is the best remaining guess.
    return called[-1] if called else linears[-1]


def _linears_in_forward_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    called: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: called.append(n))
               for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    modes = {m: m.training for m in model.modules()}  # restored exactly, even when mixed
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - any failure falls back to definition order
        called.clear()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return called


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- loading


def _is_counter(key: str) -> bool:
    # BatchNorm's num_batches_tracked only matters for momentum=None running averages, never for
    # inference or for our fine-tuning (momentum is set); checkpoints from PyTorch < 0.4.1 (and code
    # that filters buffers) lack it, so it is ignored whether missing or extra.
    return key.endswith("num_batches_tracked")


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every weight or fail with InputError listing missing, unexpected and wrongly-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_counter(k)]
    unexpected = [k for k in state_dict if k not in expected and not _is_counter(k)]
    reshaped, wrong_kind, ready = [], [], {}
    for key, value in state_dict.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            wrong_kind.append(f"{key} (a {type(value).__name__}, not a tensor)")
            continue
        target = expected[key]
        if _is_counter(key) and (value.shape != target.shape or value.is_floating_point() or value.is_complex()):
            continue  # a malformed counter is harmless (see _is_counter); keep the model's own
        if tuple(value.shape) != tuple(target.shape):
            reshaped.append(f"{key}: model {_shape(target)} vs checkpoint {_shape(value)}")
        elif target.is_floating_point() != value.is_floating_point() or value.is_complex():
            # Integer or bool values where real-valued weights belong are a broken or hostile file,
            # not something to cast silently.
            wrong_kind.append(f"{key} ({str(value.dtype).replace('torch.', '')} where the model has "
                              f"{str(target.dtype).replace('torch.', '')})")
        else:
            ready[key] = value.to(target.dtype)  # e.g. fp16/bf16 checkpoints into an fp32 model
    if missing or unexpected or reshaped or wrong_kind:
        parts = [f"{label} {len(keys)}: {_preview(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped),
                  ("wrong dtype", wrong_kind)) if keys]
        raise InputError("checkpoint does not fit the model: " + "; ".join(parts),
                         hint="wrong --arch or --num-classes? `bdclean inspect CHECKPOINT` lists its keys and shapes")
    try:
        result = model.load_state_dict(ready, strict=False)
    except RuntimeError as exc:  # checked above, so this is unexpected; still an input problem
        raise InputError(f"checkpoint does not fit the model: {_first_line(exc)}") from None
    left = [k for k in result.missing_keys if not _is_counter(k)]
    if left or result.unexpected_keys:
        raise InputError(f"checkpoint does not fit the model: missing {_preview(left)}, "
                         f"unexpected {_preview(list(result.unexpected_keys))}")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


# ----------------------------------------------------------------------------- guessing


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
