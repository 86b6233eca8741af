"""What a defense is, its hyper-parameters, the per-dataset defaults, and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError

# The FST paper's defaults (Min et al., NeurIPS 2023, Appendix): lr, epochs, alpha, clean fraction.
DATASET_DEFAULTS: dict[str, dict] = {
    "cifar10": {"lr": 0.01, "epochs": 10, "alpha": 0.2, "clean_fraction": 0.02},
    "gtsrb": {"lr": 0.01, "epochs": 15, "alpha": 0.1, "clean_fraction": 0.02},
    "cifar100": {"lr": 0.001, "epochs": 15, "alpha": 0.001, "clean_fraction": 0.05},
    "tiny-imagenet": {"lr": 0.001, "epochs": 15, "alpha": 0.001, "clean_fraction": 0.05},
}
# Datasets the paper does not cover (MNIST, user folders) get CIFAR-10's settings: same scale of task.
FALLBACK_DATASET = "cifar10"


@dataclass(frozen=True)
class DefenseParams:
    """Every hyper-parameter of a tuning defense; all are recorded in the report and metadata."""

    lr: float = 0.01
    epochs: int = 10
    alpha: float = 0.2  # FST only: weight of the <W, W_orig> penalty
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    distill: float = 1.0  # fst-kd only: weight of the distillation term (measured: docs/purification.md)
    distill_temperature: float = 2.0  # fst-kd only: softmax temperature of the distillation

    def validate(self) -> "DefenseParams":
        if not (self.lr > 0 and self.lr <= 10):
            raise ConfigError(f"lr must be in (0, 10], got {self.lr}")
        if not (1 <= self.epochs <= 10_000):
            raise ConfigError(f"epochs must be in [1, 10000], got {self.epochs}")
        if not (self.alpha >= 0):
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        if not (1 <= self.batch_size <= 65_536):
            raise ConfigError(f"batch size must be in [1, 65536], got {self.batch_size}")
        if not (0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.distill <= 1000):
            raise ConfigError(f"--distill must be in [0, 1000], got {self.distill}")
        if not (0 < self.distill_temperature <= 100):
            raise ConfigError(f"--distill-temperature must be in (0, 100], got {self.distill_temperature}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def default_params(dataset: str | None) -> dict:
    """The paper's defaults for a dataset name (falls back to CIFAR-10's)."""
    return dict(DATASET_DEFAULTS.get((dataset or "").lower(), DATASET_DEFAULTS[FALLBACK_DATASET]))


@dataclass
class DefenseOutcome:
    history: list = field(default_factory=list)  # EpochLog per epoch
    notes: list[str] = field(default_factory=list)
    head_norm: float | None = None  # FST: the Frobenius norm the head was held to


@dataclass(frozen=True)
class Defense:
    """A tuning defense: how the head starts, which parameters train, and the run function."""

    name: str
    summary: str
    reinit_head: bool
    trains: str  # 'all' | 'head' | 'body'
    uses_alpha: bool
    run: Callable[..., DefenseOutcome]


DEFENSES: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    DEFENSES[defense.name] = defense
    return defense


def get_defense(name: str) -> Defense:
    key = (name or "").strip().lower()
    if key not in DEFENSES:
        raise ConfigError(f"unknown --method {name!r}", hint=f"choose one of: {', '.join(DEFENSES)}")
    return DEFENSES[key]


def get_head(model: torch.nn.Module, head_name: str) -> torch.nn.Linear:
    head = model.get_submodule(head_name)
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"head {head_name!r} is a {type(head).__name__}, not nn.Linear")
    return head
