"""Path-aware minimisation (`pam`; Min et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024), without the paper's inverted-trigger images.

Fine-tuning on clean data where each step's gradient is taken at θ + ρ·(θ₀ − θ)/‖θ₀ − θ‖ (θ₀ the
suspect model, the norm global over the trainable parameters) and applied at θ. The authors' code
also mixes images with a trigger reconstructed by BTI-DBF into the batches; bdclean has no trigger
inversion in the tuning loop, so this is the clean-data-only variant, and docs/robustness.md measures
whether it still survives the retuning check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Defense, DefenseOutcome, MethodParams, register
from .finetune import run_tuning
from .perturbations import toward_origin


@dataclass(frozen=True)
class PamParams(MethodParams):
    rho: float | None = None  # perturbation radius toward the suspect weights (None: the paper's 0.5)

    DEFAULTS: ClassVar[dict[str, object]] = {"rho": 0.5, "label_smoothing": 0.0}


def run_pam(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """`options`: run_tuning's callbacks and loss_adapter, passed through."""
    origin = {id(p): p.detach().clone() for p in model.parameters()}
    rho = params.value("rho")
    outcome = run_tuning(
        PAM,
        model,
        head_name,
        clean,
        mean,
        std,
        params,
        device,
        flip,
        perturb_with=lambda trainable: toward_origin(trainable, [origin[id(p)] for p in trainable], rho),
        label_smoothing=params.value("label_smoothing"),
        **options,
    )
    outcome.notes.append(
        f"pam: gradients taken at rho {rho:g} toward the suspect weights (clean data only, no inverted-trigger images)"
    )
    return outcome


PAM = register(
    Defense(
        name="pam",
        summary="path-aware minimisation: fine-tune with gradients taken toward the suspect weights (clean-data variant)",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_pam,
        params_type=PamParams,
    )
)
