"""Every purify method's name and one-line summary, importable without torch, so `--help` stays fast.

The registry (defenses.DEFENSES) is the source: tests/test_method_catalog.py fails when the two differ,
so a method added there must be added here, and `--help`, the registry and docs/methods.md agree.
"""

from __future__ import annotations

METHODS: dict[str, str] = {
    "ft": "fine-tune all layers from the original weights",
    "lp": "linear probing: train the original head only",
    "fe-tuning": "re-initialise the head, freeze it, tune the feature extractor",
    "ft-init": "re-initialise the head, tune all layers",
    "fst": "feature shift tuning: re-initialised head pushed away from the original, norm held fixed",
    "fst-kd": "FST plus distillation of the input model's clean-data outputs (bdclean's variant, lower accuracy cost)",
    "ft-kd": "fine-tuning plus distillation of the input model's clean-data outputs (bdclean's variant)",
    "pam": "path-aware minimisation: fine-tune with gradients taken toward the suspect weights (clean-data variant)",
    "ft-sam": "fine-tuning with adaptive sharpness-aware minimisation (two passes per step)",
    "nad": "neural attention distillation from a fine-tuned teacher at the end of each stage",
    "clp": "channel Lipschitzness pruning: zero the channels whose Lipschitz bound is an outlier (no training)",
    "d3": "distance-driven detoxification: push the head away from the original while a hinge keeps the clean loss within epsilon",
    "sau": "shared adversarial unlearning: unlearn perturbations that fool the model and the input model alike",
    "unlearn": "scan for a trigger, then fine-tune with the reconstructed trigger stamped on clean images, labels kept",
}
DEFAULT = "unlearn"  # recipe.RECOMMENDED_METHOD (tested equal)


def method_help() -> str:
    """`purify --method`'s help: the default, then every method with its summary."""
    listed = "; ".join(f"{name}: {summary}" for name, summary in METHODS.items())
    return (
        f"Defense. Default: scan, unlearn, verify ({DEFAULT} with what a trigger inversion of the clean images "
        "finds; 20% of them held out to check the removal; docs/methods.md). A name runs that method as "
        f"published. Methods: {listed}."
    )
