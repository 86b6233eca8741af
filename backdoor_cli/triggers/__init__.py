"""Triggers: hostile-safe trigger specs, their batched application to uint8 images, and poisoned sets."""

from .spec import (
    BUILTIN_TRIGGERS,
    Trigger,
    TriggerSpec,
    build_trigger,
    load_trigger_spec,
    make_poisoned_eval_set,
    parse_trigger_spec,
    poison_training_set,
)

__all__ = [
    "BUILTIN_TRIGGERS",
    "Trigger",
    "TriggerSpec",
    "build_trigger",
    "load_trigger_spec",
    "make_poisoned_eval_set",
    "parse_trigger_spec",
    "poison_training_set",
]
