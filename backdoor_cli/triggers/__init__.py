"""Triggers: hostile-safe trigger specs, their batched application to uint8 images, and poisoned sets.

- spec: a built-in name or a YAML spec, every field checked (TriggerSpec)
- assets: trigger pictures and masks, read bounded and decoded safely
- apply: a spec built for one image shape (Trigger), applied to uint8 batches; WaNet's grid
- poison: the triggered evaluation set and dirty-label training poisoning
- values: checks and short renderings of untrusted values for error messages
"""

from .apply import Trigger, build_trigger
from .poison import make_poisoned_eval_set, poison_training_set
from .spec import BUILTIN_TRIGGERS, TriggerSpec, load_trigger_spec, parse_trigger_spec

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
