"""What a defense is, its hyper-parameters, the per-dataset defaults, and the registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from ..config import check_fields
from ..errors import ConfigError
from ..tuning.sgd import SgdSettings

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
    """Every hyper-parameter of a tuning defense: its SGD settings (always the cosine schedule) and the
    methods' own. Reports record those the method read (Defense.used_params), flat (to_dict)."""

    sgd: SgdSettings = field(default_factory=lambda: SgdSettings(epochs=10, lr=0.01))
    alpha: float = 0.2  # FST only: weight of the <W, W_orig> penalty
    distill: float = 1.0  # fst-kd only: weight of the distillation term (measured: docs/purification.md)
    distill_temperature: float = 2.0  # fst-kd only: softmax temperature of the distillation
    rho: float | None = None  # pam / ft-sam: perturbation radius (None: the method's default, METHOD_DEFAULTS)
    label_smoothing: float | None = None  # every tuning method (None: the method's default: ft-sam 0.1, others 0)
    nad_beta: tuple[float, ...] | None = None  # nad: attention-loss weight per layer (None: 500, 1000, 1000)
    nad_p: float = 2.0  # nad: power of the attention map, mean over channels of |a|^p
    nad_layers: tuple[str, ...] | None = None  # nad: module paths (None: the last block of each stage)
    teacher_epochs: int | None = None  # nad: epochs of the teacher's fine-tuning (None: --epochs)
    clp_u: float | None = None  # clp: prune channels more than u std above their layer's mean bound (None: 3)
    unlearn_fraction: float = 0.2  # unlearn: share of each tuning batch stamped with a reconstructed trigger
    d3_lambda: float | None = None  # d3: weight of the clean-loss hinge against the distance term (None: 10)
    d3_eps: float | None = None  # d3: clean-loss budget of the hinge, per image (None: 0.1)
    sau_eps: float | None = (
        None  # sau: L-inf radius of the shared adversarial examples, in [0, 1] pixel units (None: 0.2)
    )
    sau_steps: int | None = None  # sau: PGD steps per batch (None: 5)
    sau_lambda: tuple[float, ...] | None = (
        None  # sau: weights of clean CE, adversarial CE, shared unlearning (None: 1, 0, 1)
    )

    @classmethod
    def of(cls, **values) -> DefenseParams:
        """Built from flat names, as the flags and reports name them (lr=0.05, alpha=0.1): the SGD
        settings go to `sgd`, over the defaults."""
        names = {f.name for f in fields(SgdSettings)}
        sgd = dataclasses.replace(cls().sgd, **{k: v for k, v in values.items() if k in names})
        return cls(sgd=sgd, **{k: v for k, v in values.items() if k not in names})

    def method_value(self, method: str, name: str):
        """A per-method hyper-parameter: the given value, else the method's default."""
        value = getattr(self, name)
        return value if value is not None else METHOD_DEFAULTS.get(method, {}).get(name)

    def validate(self) -> DefenseParams:
        # the ranges are config.RANGES's, the flags' own: declared once
        check_fields(self.to_dict())
        if self.nad_beta is not None and not self.nad_beta:
            raise ConfigError("--nad-beta must be one or more weights in [0, 1e6], got none")
        if self.sau_lambda is not None and len(self.sau_lambda) != 3:
            raise ConfigError(
                "--sau-lambda must be three weights in [0, 1e6] (clean CE, adversarial CE, shared "
                f"unlearning), got {self.sau_lambda}"
            )
        return self

    def to_dict(self) -> dict:
        """Flat, in the order reports have always listed them (the schedule is not a choice here)."""
        sgd = self.sgd
        first = {"lr": sgd.lr, "epochs": sgd.epochs, "alpha": self.alpha, "batch_size": sgd.batch_size}
        first.update(momentum=sgd.momentum, weight_decay=sgd.weight_decay, augment=sgd.augment, seed=sgd.seed)
        return {**first, **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sgd", "alpha")}}


# Hyper-parameters only some methods have. PAM: the paper's ρ; FT-SAM: BackdoorBench's adaptive-SAM
# setting (ρ 2.0, label smoothing 0.1); NAD: its CIFAR weights for the three attention layers.
METHOD_DEFAULTS: dict[str, dict] = {
    "pam": {"rho": 0.5, "label_smoothing": 0.0},
    "ft-sam": {"rho": 2.0, "label_smoothing": 0.1},
    "nad": {"nad_beta": (500.0, 1000.0, 1000.0)},
    "clp": {"clp_u": 3.0},
    # D3: the paper's lambda 10 and epsilon 0.1 (the authors' repo config has lambda 0.5; see d3.py).
    "d3": {"d3_lambda": 10.0, "d3_eps": 0.1, "label_smoothing": 0.0},
    # SAU: BackdoorBench's CIFAR-10 config: L-inf 0.2 in [0, 1] pixels, 5 PGD steps, weights 1, 0, 1.
    "sau": {"sau_eps": 0.2, "sau_steps": 5, "sau_lambda": (1.0, 0.0, 1.0), "label_smoothing": 0.0},
}


def default_params(dataset: str | None) -> dict:
    """The paper's defaults for a dataset name (falls back to CIFAR-10's)."""
    return dict(DATASET_DEFAULTS.get((dataset or "").lower(), DATASET_DEFAULTS[FALLBACK_DATASET]))


@dataclass
class DefenseOutcome:
    history: list = field(default_factory=list)  # EpochLog per epoch
    notes: list[str] = field(default_factory=list)
    head_norm: float | None = None  # FST: the Frobenius norm the head was held to


# Hyper-parameters only some methods read (each Defense names its own in `own_params`), and the ones
# every tuning method reads. A flag of the first kind given to a method that does not read it is
# refused by name (`inapplicable`), and reports record only the parameters the method used.
METHOD_PARAMS: tuple[str, ...] = (
    "alpha",
    "distill",
    "distill_temperature",
    "rho",
    "nad_beta",
    "nad_p",
    "nad_layers",
    "teacher_epochs",
    "clp_u",
    "unlearn_fraction",
    "d3_lambda",
    "d3_eps",
    "sau_eps",
    "sau_steps",
    "sau_lambda",
)
TUNING_PARAMS: tuple[str, ...] = tuple(f.name for f in fields(SgdSettings) if f.name != "schedule") + (
    "label_smoothing",
)


@dataclass(frozen=True)
class Defense:
    """A tuning defense: how the head starts, which parameters train, and the run function."""

    name: str
    summary: str
    reinit_head: bool
    trains: str  # 'all' | 'head' | 'body' | 'none' (clp prunes, it does not tune)
    uses_alpha: bool
    run: Callable[..., DefenseOutcome]
    own_params: tuple[str, ...] = ()  # the METHOD_PARAMS this method reads
    # True for a method that removes what a trigger inversion found (unlearn): purify scans first and
    # passes the reconstructed triggers to `run` as `triggers=`.
    needs_triggers: bool = False

    @property
    def used_params(self) -> tuple[str, ...]:
        """Every DefenseParams field this method reads: what its report records."""
        common = TUNING_PARAMS if self.trains != "none" else ("seed",)
        return common + self.own_params


def methods_using(param: str) -> list[str]:
    return [d.name for d in DEFENSES.values() if param in d.used_params]


def inapplicable(defense: Defense, given: dict[str, object], chosen_by: str | None = None) -> list[str]:
    """The given (not None) hyper-parameters that `defense` would ignore, as messages naming the flag.
    `chosen_by` names how the method was chosen when the user did not name it (e.g. "the default method")."""
    messages = []
    for name, value in given.items():
        if value is None or name in defense.used_params:
            continue
        users = methods_using(name)
        flag = "--" + name.replace("_", "-")
        where = f"{chosen_by} ({defense.name})" if chosen_by else f"--method {defense.name}"
        messages.append(f"{flag} does not apply to {where}" + (f" (it is read by {', '.join(users)})" if users else ""))
    return messages


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
