"""The one training loop every defense and `train` use.

Data stays on the device as uint8; each step gathers a batch by index, augments it with batched
tensor ops, normalises and steps. Nothing reads a value back to the host inside an epoch: loss
and accuracy accumulate on the device and are read once per epoch (a per-step `.item()` would
stall a GPU on every batch).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..data.datasets import ImageSet, augment_batch, iterate_minibatches, normalize
from ..errors import ConfigError
from ..models.output_kind import LOGITS, LossAdapter, attach_loss
from ..precision import as_format, autocast, default_precision
from .graphed_step import GraphedStep
from .sgd import Schedule, Sgd, SgdSettings


@dataclass(frozen=True)
class TuneSettings:
    """One tuning run: its SGD settings (optimiser, schedule, batch, augmentation, seed) and what the
    loop adds to them."""

    sgd: SgdSettings
    flip: bool = True  # with sgd.augment: random horizontal flips too
    label_smoothing: float = 0.0
    # CUDA only: replay each full batch's step as a captured graph (graphed_step.py); the environment
    # variable BDCLEAN_CUDA_GRAPHS=0 turns it off for a run. The report's history says what ran.
    cuda_graphs: bool = True

    def to_dict(self) -> dict:
        """Flat, in the order `train`'s metadata has always recorded them."""
        sgd = self.sgd
        return {
            "epochs": sgd.epochs,
            "lr": sgd.lr,
            "batch_size": sgd.batch_size,
            "momentum": sgd.momentum,
            "weight_decay": sgd.weight_decay,
            "augment": sgd.augment,
            "flip": self.flip,
            "seed": sgd.seed,
            "schedule": sgd.schedule,
            "label_smoothing": self.label_smoothing,
            "cuda_graphs": self.cuda_graphs,
            "warmup_epochs": sgd.warmup_epochs,
        }


@dataclass
class EpochLog:
    epoch: int
    loss: float  # mean tuning loss (cross-entropy, or NLL for a model ending in a softmax) without any penalty term
    train_acc: float  # accuracy on the (augmented) tuning batches
    lr: float
    seconds: float
    execution: str = ""  # CUDA: how the steps ran (CUDA graph replays or eager, and why); empty on CPU

    def to_dict(self) -> dict:
        out = {
            "epoch": self.epoch,
            "loss": round(self.loss, 6),
            "train_acc": round(self.train_acc, 6),
            "lr": self.lr,
            "seconds": round(self.seconds, 3),
        }
        if self.execution:
            out["execution"] = self.execution
        return out


def tune(
    model: torch.nn.Module,
    data: ImageSet,
    mean: torch.Tensor,
    std: torch.Tensor,
    settings: TuneSettings,
    device: torch.device,
    params: Iterable[torch.nn.Parameter] | None = None,
    frozen_modules: Iterable[torch.nn.Module] = (),
    penalty: Callable[[], torch.Tensor] | None = None,
    batch_penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    loss_adapter: LossAdapter = LOGITS,
    perturb: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    no_augment: torch.Tensor | None = None,
    stamp: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    after_augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    precision: str | None = None,
    memory_format: str = "channels_last",
) -> list[EpochLog]:
    """Train `params` (default: all) of `model` on `data` (uint8 NHWC, already on `device`).

    `frozen_modules` stay in eval mode so a frozen part keeps its BatchNorm statistics too.
    `penalty()` is added to each minibatch loss, and `batch_penalty(inputs, logits)` (a term that
    needs the batch, e.g. distillation from a teacher) too; `after_step()` runs after each optimiser step.
    `loss_adapter` says how the loss is formed from the output (models.output_kind): cross-entropy on
    it for a logits model, the default.

    `perturb(grads_here)` moves the weights before each step's forward pass and returns the function
    that moves them back: the gradient is taken at the moved point and applied at the original one
    (SAM, PAM). `grads_here()` runs forward and backward on the step's batch at the current weights,
    for a perturbation that needs that gradient first (SAM).
    `objective(loss, inputs, labels, scores)` returns the term that is minimised in place of the
    batch's mean tuning loss `loss` (penalties are still added to it), for a method whose data term is
    not the plain loss (D3's hinge, SAU's adversarial terms); the history still logs `loss`. It must
    not leave gradients on the parameters (use torch.autograd.grad for an inner optimisation).
    `no_augment` (bool per image of `data`) marks images that are used as they are, never augmented.
    `stamp(inputs, generator)` edits each normalised batch after augmentation and before the step (the
    unlearning defense stamps reconstructed triggers on part of it); it runs outside a captured graph.
    `after_augment(xb, idx)` edits each uint8 batch after augmentation (if any) and before normalisation, given
    its images' indices in `data` (training stamps a poisoned image's trigger there, so crop+flip never move it).
    `precision` (fp32 | bf16; None: the device's default) is the forward pass's autocast; the
    parameters and the loss stay fp32. `memory_format` is the one the model is in (precision.py).
    """
    precision = precision or default_precision(device)
    sgd = settings.sgd
    if sgd.epochs < 1 or sgd.batch_size < 1 or sgd.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and lr > 0")
    if not 0 <= sgd.warmup_epochs <= sgd.epochs:
        raise ConfigError(f"warm-up epochs must be in [0, epochs = {sgd.epochs}], got {sgd.warmup_epochs:g}")
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen")
    optimizer = Sgd(trainable, sgd.lr, sgd.momentum, sgd.weight_decay, device)
    scheduler = Schedule(optimizer, sgd.schedule, sgd.epochs)
    generator = torch.Generator(device=device).manual_seed(sgd.seed)
    frozen_modules = list(frozen_modules)
    n = data.num_images
    history: list[EpochLog] = []
    step = 0
    warm_steps = round(sgd.warmup_epochs * steps_per_epoch(n, sgd.batch_size))
    # The autocast cache cannot outlive a graph capture; it saves nothing here (each weight is cast once a step).
    cast_cache = device.type != "cuda"

    def forward_backward(inputs: torch.Tensor, yb: torch.Tensor):
        with autocast(device, precision, cache=cast_cache):
            output = model(inputs)
        loss, logits = loss_fn(output, yb)
        term = objective(loss, inputs, yb, logits) if objective is not None else loss
        total = term + penalty() if penalty is not None else term
        if batch_penalty is not None:
            total = total + batch_penalty(inputs, logits)
        optimizer.zero_grad()
        total.backward()
        return loss, logits

    def apply_step(loss: torch.Tensor, logits: torch.Tensor):
        """The optimiser step on the gradients forward_backward left, then after_step."""
        optimizer.step()
        if after_step is not None:
            after_step()
        return loss.detach(), logits.detach()

    def train_step(inputs: torch.Tensor, yb: torch.Tensor):
        """Forward, backward, optimiser step and after_step: the unit a CUDA graph captures."""
        return apply_step(*forward_backward(inputs, yb))

    def refusal() -> str | None:
        if optimizer.capturable:
            return None
        return f"the fused SGD kernel was unavailable ({optimizer.fallback}), so the rate is not a device tensor"

    graphed = GraphedStep(train_step, sgd.batch_size, refusal) if use_cuda_graphs(device, settings, perturb) else None
    run_step = graphed or train_step
    # The adapter's hook (a trailing softmax's input) lives exactly as long as the run.
    with attach_loss(model, loss_adapter, settings.label_smoothing) as loss_fn:
        for epoch in range(sgd.epochs):
            start = time.perf_counter()
            model.train()
            for module in frozen_modules:
                module.eval()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            lr = scheduler.lr  # the schedule's float: no device read, the same figure on every machine
            for idx in iterate_minibatches(n, sgd.batch_size, generator, shuffle=True):
                if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a batch of one
                    continue
                xb, yb = data.x[idx], data.y[idx]
                if sgd.augment:
                    xb = _augment(xb, generator, settings.flip, None if no_augment is None else no_augment[idx])
                if after_augment is not None:
                    xb = after_augment(xb, idx)
                inputs = normalize(xb, mean, std)
                if stamp is not None:
                    inputs = stamp(inputs, generator)
                inputs = as_format(inputs, memory_format)
                if step < warm_steps:  # the rate ramps up to the schedule's (set_lr fills a captured graph's tensor)
                    optimizer.set_lr(lr * (step + 1) / warm_steps)
                elif step == warm_steps and warm_steps:
                    optimizer.set_lr(lr)
                if perturb is not None:  # SAM / PAM: the gradient at the moved point, applied at the original
                    restore = perturb(functools.partial(forward_backward, inputs, yb))
                    loss, logits = forward_backward(inputs, yb)
                    restore()
                    loss, logits = apply_step(loss, logits)
                else:
                    loss, logits = run_step(inputs, yb)
                loss_sum += loss * len(idx)
                correct += (logits.argmax(1) == yb).sum()
                seen += len(idx)
                step += 1
                if on_step is not None:
                    on_step(step)
            scheduler.step()
            if seen == 0:
                raise ConfigError("the tuning set is too small for one training batch")
            log = EpochLog(
                epoch + 1,
                loss_sum.item() / seen,
                correct.item() / seen,
                lr,
                time.perf_counter() - start,
                execution=execution_status(device, graphed, perturb),
            )
            if log.loss != log.loss or log.loss == float("inf"):
                raise ConfigError(f"training diverged at epoch {epoch + 1} (loss is {log.loss})", hint="lower --lr")
            history.append(log)
            if on_epoch is not None:
                on_epoch(log)
    return history


def use_cuda_graphs(device: torch.device, settings: TuneSettings, perturb) -> bool:
    """Graphs on CUDA unless turned off (settings or BDCLEAN_CUDA_GRAPHS=0), and not for SAM/PAM, whose
    step runs two passes with a weight move between them."""
    if device.type != "cuda" or not settings.cuda_graphs or perturb is not None:
        return False
    return os.environ.get("BDCLEAN_CUDA_GRAPHS", "1").strip() not in ("0", "false", "no", "off")


def execution_status(device: torch.device, graphed: GraphedStep | None, perturb) -> str:
    if device.type != "cuda":
        return ""
    if graphed is not None:
        return graphed.status
    return "eager (weight-perturbing method)" if perturb is not None else "eager (CUDA graphs turned off)"


def _augment(xb: torch.Tensor, generator: torch.Generator, flip: bool, keep: torch.Tensor | None) -> torch.Tensor:
    """Augment the batch; images marked in `keep` stay as they are (the random draws are made for all,
    so marking images does not change what the others get)."""
    augmented = augment_batch(xb, generator, flip=flip)
    if keep is None:
        return augmented
    return torch.where(keep[:, None, None, None], xb, augmented)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, -(-n // batch_size))
