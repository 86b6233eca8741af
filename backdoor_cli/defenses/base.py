"""What a defense is, its hyper-parameters, the per-dataset defaults, and the registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from ..config import check_fields
from ..errors import ConfigError
from ..models.depth import EarlyLayers
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
class MethodParams:
    """A method's own hyper-parameters: each method declares a small frozen dataclass of them beside its
    code (FstParams, NadParams, ...; a method with none uses this empty one). A field left None takes the
    method's default from DEFAULTS (reports record the None: the default applied); DEFAULTS may also
    give the method's label smoothing."""

    DEFAULTS: ClassVar[dict[str, object]] = {}

    def validate(self) -> MethodParams:
        # the ranges are config.RANGES's, the flags' own: declared once
        check_fields(dataclasses.asdict(self))
        return self


@dataclass(frozen=True)
class DefenseParams:
    """Every hyper-parameter of a run of one defense: its SGD settings (always the cosine schedule), the
    label smoothing every tuning method reads, and the method's own parameters (`own`, an instance of
    the method's `params_type`). Reports record those the method read (Defense.used_params), flat (to_dict)."""

    sgd: SgdSettings = field(default_factory=lambda: SgdSettings(epochs=10, lr=0.01))
    label_smoothing: float | None = None  # every tuning method (None: the method's default: ft-sam 0.1, others 0)
    own: MethodParams = field(default_factory=MethodParams)

    @classmethod
    def of(cls, method: str | None = None, **values) -> DefenseParams:
        """Built from flat names, as the flags and reports name them (lr=0.05, alpha=0.1), for `method`
        (None: a method without parameters of its own): the SGD settings go to `sgd` over the defaults,
        the method's own to its `params_type`; a name the method does not read is refused."""
        defense = get_defense(method) if method is not None else None
        sgd_names = {f.name for f in fields(SgdSettings)}
        own_type = defense.params_type if defense is not None else MethodParams
        own_names = {f.name for f in fields(own_type)}
        unread = {k: v for k, v in values.items() if k not in sgd_names | own_names | {"label_smoothing"}}
        if unread:
            raise ConfigError(f"{', '.join(sorted(unread))}: not a parameter of {method or 'a method without its own'}")
        sgd = dataclasses.replace(cls().sgd, **{k: v for k, v in values.items() if k in sgd_names})
        own = own_type(**{k: v for k, v in values.items() if k in own_names})
        return cls(sgd=sgd, label_smoothing=values.get("label_smoothing"), own=own)

    def value(self, name: str):
        """A parameter the method reads (its own, or label_smoothing): the given value, else the method's default."""
        value = self.label_smoothing if name == "label_smoothing" else getattr(self.own, name)
        return value if value is not None else type(self.own).DEFAULTS.get(name)

    def validate(self) -> DefenseParams:
        # the ranges are config.RANGES's, the flags' own: declared once
        check_fields(self.to_dict())
        self.own.validate()  # and what the method checks beyond the ranges
        return self

    def to_dict(self) -> dict:
        """Flat, in the order reports have always listed them (REPORT_ORDER; the schedule is not a choice here)."""
        sgd = self.sgd
        flat = {
            "lr": sgd.lr,
            "epochs": sgd.epochs,
            "batch_size": sgd.batch_size,
            "momentum": sgd.momentum,
            "weight_decay": sgd.weight_decay,
            "augment": sgd.augment,
            "seed": sgd.seed,
            "label_smoothing": self.label_smoothing,
            **dataclasses.asdict(self.own),
        }
        rank = {name: i for i, name in enumerate(REPORT_ORDER)}
        return dict(sorted(flat.items(), key=lambda item: rank.get(item[0], len(rank))))


# The order reports have listed the parameters in since before each method declared its own; a method's
# parameters not named here follow label_smoothing in their declaration order.
REPORT_ORDER: tuple[str, ...] = (
    "lr",
    "epochs",
    "alpha",
    "batch_size",
    "momentum",
    "weight_decay",
    "augment",
    "seed",
    "distill",
    "distill_temperature",
    "rho",
    "label_smoothing",
)


def default_params(dataset: str | None) -> dict:
    """The paper's defaults for a dataset name (falls back to CIFAR-10's)."""
    return dict(DATASET_DEFAULTS.get((dataset or "").lower(), DATASET_DEFAULTS[FALLBACK_DATASET]))


@dataclass
class DefenseOutcome:
    history: list = field(default_factory=list)  # EpochLog per epoch
    notes: list[str] = field(default_factory=list)
    head_norm: float | None = None  # FST: the Frobenius norm the head was held to
    held: EarlyLayers | None = None  # unlearn: the early layers held at the input's weights (None: none held)


# The hyper-parameters every tuning method reads; each method's own are the fields of its `params_type`.
# A flag of a method's own given to a method that does not read it is refused by name (`inapplicable`),
# and reports record only the parameters the method used.
# The schedule and its warm-up are not choices of a defense (cosine, no warm-up: `train` alone sets them).
TUNING_PARAMS: tuple[str, ...] = tuple(
    f.name for f in fields(SgdSettings) if f.name not in ("schedule", "warmup_epochs")
) + ("label_smoothing",)


def method_params() -> tuple[str, ...]:
    """Every registered method's own parameters, in registration order: the flags a method may refuse."""
    names: list[str] = []
    for defense in DEFENSES.values():
        names += [name for name in defense.own_params if name not in names]
    return tuple(names)


@dataclass(frozen=True)
class Defense:
    """A tuning defense: how the head starts, which parameters train, and the run function."""

    name: str
    summary: str
    reinit_head: bool
    trains: str  # 'all' | 'head' | 'body' | 'none' (clp prunes, it does not tune)
    uses_alpha: bool
    run: Callable[..., DefenseOutcome]
    params_type: type[MethodParams] = MethodParams  # its own hyper-parameters, declared beside the method
    # True for a method that removes what a trigger inversion found (unlearn): purify scans first and
    # passes the reconstructed triggers to `run` as `triggers=`.
    needs_triggers: bool = False

    @property
    def own_params(self) -> tuple[str, ...]:
        """The hyper-parameters only this method reads: its params_type's fields."""
        return tuple(f.name for f in fields(self.params_type))

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
