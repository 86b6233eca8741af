"""SGD with momentum and its learning-rate schedules, without `torch.optim`.

Why not torch.optim: creating any torch optimizer imports `torch._dynamo` (and with it sympy and
parts of torch.distributed): 1.6 s on a 2-core CPU and seconds on a GPU host, more than a whole
graph-replayed tuning of a CIFAR ResNet. The update here is the one torch's SGD makes (no dampening,
no Nesterov), with the same kernels:
- on CPU, the multi-tensor (foreach) ops in torch's order, so the weights are bit-for-bit those
  `torch.optim.SGD(foreach=True)` gives (tests/test_sgd.py checks it);
- on CUDA, torch's fused SGD kernel, reading the learning rate from a device tensor, so a captured
  step (graphed_step.py) picks up each epoch's rate without being captured again.
The schedules compute the learning rate as torch's CosineAnnealingLR and a constant LambdaLR do, to the bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SgdSettings:
    """One SGD run's settings, declared once for every tuning (defenses, `train`, the retuning check):
    the optimiser (lr, momentum, weight decay), its schedule over `epochs` (cosine annealing stepped
    per epoch, or constant), the batch, whether the tuning images are augmented, and the seed of the
    data order and augmentation."""

    epochs: int
    lr: float
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    schedule: str = "cosine"  # 'cosine' | 'constant' (the retuning check's protocol has no schedule)
    # Linear warm-up over the first `warmup_epochs` epochs' steps, scaling the schedule's rate from 1/steps
    # to 1 (0: none): the first steps of an untrained net take the largest jumps. (A from-scratch VGG-16-BN at
    # lr 0.05 diverged without it, and did not learn with one epoch of 50 steps either: docs/training.md.)
    warmup_epochs: float = 0.0


class Sgd:
    """p <- p - lr * buf, buf <- momentum * buf + (grad + weight_decay * p); buf starts as the first grad.
    Parameters without a gradient in a step are left alone, as torch's SGD does."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        momentum: float,
        weight_decay: float,
        device: torch.device,
        fused: bool | None = None,
    ):
        """`fused` (default: on CUDA) picks torch's fused kernel with a device-tensor learning rate."""
        self.params = list(params)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.fused = device.type == "cuda" if fused is None else fused
        self.base_lr = float(lr)  # as given: the schedule computes from it (a float32 tensor would round it)
        # A device tensor on CUDA (read by the fused kernel, filled in place by set_lr); a float on CPU.
        self.lr: float | torch.Tensor = (
            torch.tensor(lr, dtype=torch.float32, device=device) if self.fused else float(lr)
        )
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.fallback: str | None = None  # why the fused kernel was given up for the foreach update, if it was

    @property
    def lr_value(self) -> float:
        return float(self.lr)  # one host read on CUDA: per epoch, never per step

    def set_lr(self, lr: float) -> None:
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if self.fused:
            self._fused_step(live, params, grads)
        else:
            self._foreach_step(live, params, grads)

    @property
    def capturable(self) -> bool:
        """Whether a captured step stays right across epochs: only when the rate is a device tensor."""
        return self.fused and isinstance(self.lr, torch.Tensor)

    def _fused_step(self, live: list[int], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        try:
            self._fused_kernel(live, params, grads)
        except (RuntimeError, TypeError) as exc:
            # A torch without the tensor-lr fused kernel for these tensors: the foreach update with a float
            # rate computes the same step (to float rounding); graph capture is then off (`capturable`).
            self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            self.fused, self.lr = False, float(self.lr)
            self._foreach_step(live, params, grads)

    def _fused_kernel(self, live: list[int], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        first = all(self.buffers[i] is None for i in live) and self.momentum != 0
        # New buffers are kept only once the kernel has run: a failed call must leave no uninitialised buffer.
        # On the first step the kernel copies the gradient in; a parameter first seen later starts from zero,
        # which gives the same buffer (momentum * 0 + grad).
        fresh = {
            i: (torch.empty_like(g) if first else torch.zeros_like(g))
            for i, g in zip(live, grads)
            if self.buffers[i] is None and self.momentum != 0
        }
        buffers = [] if self.momentum == 0 else [self.buffers[i] if i not in fresh else fresh[i] for i in live]
        torch._fused_sgd_(
            params,
            grads,
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=first,
        )
        for i, buffer in fresh.items():
            self.buffers[i] = buffer

    def _foreach_step(self, live: list[int], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        # The operations and their order are torch's foreach SGD (torch/optim/sgd.py, dampening 0).
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum != 0:
            if all(self.buffers[i] is not None for i in live):
                buffers = [self.buffers[i] for i in live]
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, grads, alpha=1.0)
            else:
                buffers = []
                for i, g in zip(live, grads):
                    if self.buffers[i] is None:
                        self.buffers[i] = g.detach().clone()
                    else:
                        self.buffers[i].mul_(self.momentum).add_(g, alpha=1.0)
                    buffers.append(self.buffers[i])
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)


class Schedule:
    """The learning rate of each epoch: 'cosine' (torch's CosineAnnealingLR with T_max = epochs, eta_min 0,
    stepped once per epoch, computed in its recursive form so the rates are the same floats) or 'constant'."""

    def __init__(self, optimizer: Sgd, kind: str, epochs: int):
        if kind not in ("cosine", "constant"):
            raise ConfigError(f"unknown learning-rate schedule {kind!r}", hint="choose cosine or constant")
        self.optimizer, self.kind, self.epochs = optimizer, kind, epochs
        self.base = self.lr = optimizer.base_lr
        self.epoch = 0

    def step(self) -> None:
        self.epoch += 1
        if self.kind == "cosine":
            e, t = self.epoch, self.epochs
            if (e - 1 - t) % (2 * t) == 0:  # torch's branch at the end of a half-cycle
                self.lr = self.lr + self.base * (1 - math.cos(math.pi / t)) / 2
            else:
                self.lr = (1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t)) * self.lr
        self.optimizer.set_lr(self.lr)
