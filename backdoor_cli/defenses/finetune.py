"""The paper's baselines: FT, LP, FE-tuning and FT-init (and the shared machinery FST reuses).

| method    | head at start  | trained                          |
|-----------|----------------|----------------------------------|
| ft        | original       | all                              |
| lp        | original       | head only (body frozen, BN stats too) |
| fe-tuning | re-initialised | all but the head (head frozen)   |
| ft-init   | re-initialised | all                              |

LP keeps the body's BatchNorm layers in eval mode: "head only" should leave every body tensor,
running statistics included, byte-identical. (The reference code leaves them in train mode, so its
LP silently shifts BN statistics; we consider that a bug, not part of the method.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.datasets import ImageSet
from ..models.output_kind import LOGITS, LossAdapter
from ..tuning.loop import TuneSettings, tune
from .base import Defense, DefenseOutcome, DefenseParams, get_head, register


def reinitialise_head(head: torch.nn.Linear, seed: int) -> None:
    """PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), from a seeded generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / head.in_features**0.5
    with torch.no_grad():
        weight = torch.empty(head.weight.shape).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(head.out_features).uniform_(-bound, bound, generator=generator)
        head.weight.copy_(weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias))


def select_trainable(model: torch.nn.Module, head: torch.nn.Linear, trains: str, held: Sequence[torch.nn.Module] = ()):
    """Return (params to train, modules to hold in eval mode) and set requires_grad to match. The `held` modules
    (a defense's choice, e.g. the unlearning's early layers) neither train nor update their statistics."""
    head_params = set(map(id, head.parameters()))
    held_params = {id(p) for m in held for p in m.parameters()}
    for p in model.parameters():
        in_head = id(p) in head_params
        p.requires_grad_((trains == "all" or (trains == "head") == in_head) and id(p) not in held_params)
    frozen: list[torch.nn.Module] = []
    if trains == "head":
        frozen = [m for m in model.modules() if m is not model and m is not head and not list(m.children())]
    frozen += [m for m in held if all(m is not f for f in frozen)]
    return [p for p in model.parameters() if p.requires_grad], frozen


def run_tuning(
    defense: Defense,
    model,
    head_name: str,
    clean: ImageSet,
    mean,
    std,
    params: DefenseParams,
    device,
    flip: bool,
    penalty=None,
    after_step=None,
    on_step=None,
    on_epoch=None,
    loss_adapter: LossAdapter = LOGITS,
    batch_penalty=None,
    perturb_with=None,
    label_smoothing: float | None = None,
    precision: str | None = None,
    memory_format: str = "channels_last",
    stamp=None,
    objective=None,
    init_head=None,
    cuda_graphs: bool = True,
    held: Sequence[torch.nn.Module] = (),
) -> DefenseOutcome:
    """Tune per the defense's recipe; `loss_adapter` says how the loss is formed from the model's output;
    `precision`, `memory_format` and `stamp` as for tuning.tune.

    `perturb_with(trainable)` makes the step's weight perturbation (defenses.perturbations) once the
    trainable parameters are known. `objective` is tuning.tune's (a data term in place of the loss).
    `init_head(head, seed)` re-initialises the head in place of PyTorch's default init when the defense
    re-initialises it; `cuda_graphs` False keeps every step eager on CUDA; `held` modules keep the input's weights
    and statistics (select_trainable)."""
    head = get_head(model, head_name)
    if label_smoothing is None:  # the user's --label-smoothing applies to every tuning method, not only ft-sam's
        label_smoothing = params.value("label_smoothing") or 0.0
    if defense.reinit_head:
        (init_head or reinitialise_head)(head, params.sgd.seed)
    trainable, frozen = select_trainable(model, head, defense.trains, held)
    perturb = perturb_with(trainable) if perturb_with is not None else None
    settings = TuneSettings(params.sgd, flip=flip, label_smoothing=label_smoothing, cuda_graphs=cuda_graphs)
    try:
        history = tune(
            model,
            clean,
            mean,
            std,
            settings,
            device,
            params=trainable,
            frozen_modules=frozen,
            penalty=penalty,
            batch_penalty=batch_penalty,
            after_step=after_step,
            on_step=on_step,
            on_epoch=on_epoch,
            loss_adapter=loss_adapter,
            perturb=perturb,
            stamp=stamp,
            precision=precision,
            memory_format=memory_format,
            objective=objective,
        )
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return DefenseOutcome(history=history)


def _make(name: str, summary: str, reinit_head: bool, trains: str) -> Defense:
    defense_ref: list[Defense] = []

    def run(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
        return run_tuning(defense_ref[0], model, head_name, clean, mean, std, params, device, flip, **options)

    defense = Defense(name=name, summary=summary, reinit_head=reinit_head, trains=trains, uses_alpha=False, run=run)
    defense_ref.append(defense)
    return register(defense)


FT = _make("ft", "fine-tune all layers from the original weights", reinit_head=False, trains="all")
LP = _make("lp", "linear probing: train the original head only", reinit_head=False, trains="head")
FE_TUNING = _make(
    "fe-tuning", "re-initialise the head, freeze it, tune the feature extractor", reinit_head=True, trains="body"
)
FT_INIT = _make("ft-init", "re-initialise the head, tune all layers", reinit_head=True, trains="all")
