"""Neural attention distillation (`nad`; Li et al., "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021).

A teacher is the suspect model fine-tuned on the clean data (plain FT). The student, the suspect model
again, is then tuned with cross-entropy plus, at a few layers l, β_l · mean((A_s − A_t)²), where
A = normalise(mean over channels of |a|^p) is the layer's spatial attention map. Fine-tuning alone
weakens the backdoor a little; the attention maps carry that change to the student more strongly
than its labels do.

Layers: by default the end of each of the last three stages, found by running one batch: a stage is a
run of modules with 4-D outputs of one spatial size, and its end is the last module (in the order
their forward calls finish) of that size, so a container such as ResNet's `layer3` is chosen over its
last block. Spatial maps of a single pixel are skipped (no attention to distil). For the built-in
models this gives: resnet20/32/44/56 layer1, layer2, layer3; resnet18 and preactresnet18 layer2,
layer3, layer4 (bdclean's CIFAR versions). `--nad-layers` names them explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.probing import probe_forward
from .base import Defense, DefenseOutcome, MethodParams, register
from .finetune import FT, run_tuning


@dataclass(frozen=True)
class NadParams(MethodParams):
    nad_beta: tuple[float, ...] | None = None  # attention-loss weight per layer (None: 500, 1000, 1000)
    nad_p: float = 2.0  # power of the attention map, mean over channels of |a|^p
    nad_layers: tuple[str, ...] | None = None  # module paths (None: the last block of each stage)
    teacher_epochs: int | None = None  # epochs of the teacher's fine-tuning (None: --epochs)

    # NAD's CIFAR weights for its three attention layers
    DEFAULTS: ClassVar[dict[str, object]] = {"nad_beta": (500.0, 1000.0, 1000.0)}

    def validate(self) -> NadParams:
        super().validate()
        if self.nad_beta is not None and not self.nad_beta:
            raise ConfigError("--nad-beta must be one or more weights in [0, 1e6], got none")
        return self


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): mean over channels of |a|^p, each row scaled to unit L2 norm."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@torch.no_grad()
def stage_ends(model: torch.nn.Module, batch: torch.Tensor, count: int = 3) -> list[str]:
    """The last `count` stage ends of `model` on `batch` (see the module docstring)."""
    finished: list[tuple[str, tuple[int, int]]] = []
    hooks = [
        (
            m,
            lambda _m, _i, out, n=n: (
                finished.append((n, tuple(out.shape[2:]))) if isinstance(out, torch.Tensor) and out.ndim == 4 else None
            ),
        )
        for n, m in model.named_modules()
        if n
    ]
    probe_forward(model, batch, hooks)
    ends: list[str] = []
    for i, (name, size) in enumerate(finished):
        last_of_run = i + 1 == len(finished) or finished[i + 1][1] != size
        if last_of_run and size[0] * size[1] > 1:
            ends.append(name)
    if not ends:
        raise ConfigError(
            "nad: the model has no layer with a spatial feature map to distil",
            hint="name layers with --nad-layers, or choose another --method",
        )
    return ends[-count:]


@contextlib.contextmanager
def capture(model: torch.nn.Module, layers: list[str]):
    """A dict filled with each layer's latest output during every forward pass."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"nad: the model has no module {name!r}", hint="check --nad-layers") from None
            handles.append(module.register_forward_hook(lambda _m, _i, out, n=name: store.__setitem__(n, out)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def layer_weights(given: tuple[float, ...] | None, default: tuple[float, ...], layers: list[str]) -> tuple[float, ...]:
    """One weight per layer: a single weight is used for all; the default's last weights go to the deepest
    layers (NAD's 500, 1000, 1000) when a model has fewer stages; weights the user gave must match."""
    weights = tuple(given if given is not None else default)
    if len(weights) == 1:
        return weights * len(layers)
    if given is None and len(weights) >= len(layers):
        return weights[-len(layers) :]
    if len(weights) != len(layers):
        raise ConfigError(
            f"nad: {len(layers)} layers ({', '.join(layers)}) but {len(weights)} --nad-beta weights",
            hint="give one weight, or one per layer",
        )
    return weights


def run_nad(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """Teacher = FT of a copy for `teacher_epochs`; then the student tunes with the attention losses."""
    from ..data.datasets import normalize  # local: keeps the defense module light to import

    teacher = copy.deepcopy(model)
    teacher_sgd = dataclasses.replace(params.sgd, epochs=params.own.teacher_epochs or params.sgd.epochs)
    teacher_params = dataclasses.replace(params, sgd=teacher_sgd)
    quiet = {k: v for k, v in options.items() if k in ("loss_adapter", "precision", "memory_format")}
    run_tuning(FT, teacher, head_name, clean, mean, std, teacher_params, device, flip, **quiet)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    sample = normalize(clean.x[: min(8, clean.num_images)], mean, std)
    layers = list(params.own.nad_layers) if params.own.nad_layers else stage_ends(model, sample)
    betas = layer_weights(params.own.nad_beta, params.value("nad_beta"), layers)
    with capture(model, layers) as student_maps, capture(teacher, layers) as teacher_maps:

        def attention_term(inputs: torch.Tensor, _scores: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher(inputs)
            return sum(
                b * attention_loss(student_maps[n], teacher_maps[n], params.own.nad_p) for b, n in zip(betas, layers)
            )

        outcome = run_tuning(
            NAD, model, head_name, clean, mean, std, params, device, flip, batch_penalty=attention_term, **options
        )
    outcome.notes.append(
        f"nad: teacher fine-tuned {teacher_params.sgd.epochs} epochs; attention at "
        + ", ".join(f"{n} (beta {b:g})" for n, b in zip(layers, betas))
        + f", p {params.own.nad_p:g}"
    )
    return outcome


NAD = register(
    Defense(
        name="nad",
        summary="neural attention distillation from a fine-tuned teacher at the end of each stage",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_nad,
        params_type=NadParams,
    )
)
