"""Fine-tuning with sharpness-aware minimisation (`ft-sam`; Zhu et al., "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

Backdoor neurons sit in sharp regions of the clean loss; SAM's ascent step pushes the tuning toward
flat minima, which moves those weights more than plain fine-tuning does. The default is adaptive SAM
(ASAM: the perturbation scaled by |θ|), ρ 2.0, label smoothing 0.1, BackdoorBench's setting. Each step
costs two forward and backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Defense, DefenseOutcome, MethodParams, register
from .finetune import run_tuning
from .perturbations import sharpness_ascent


@dataclass(frozen=True)
class FtSamParams(MethodParams):
    rho: float | None = None  # SAM's perturbation radius (None: BackdoorBench's adaptive-SAM 2.0)

    DEFAULTS: ClassVar[dict[str, object]] = {"rho": 2.0, "label_smoothing": 0.1}


def run_ft_sam(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    rho = params.value("rho")
    smoothing = params.value("label_smoothing")
    outcome = run_tuning(
        FT_SAM,
        model,
        head_name,
        clean,
        mean,
        std,
        params,
        device,
        flip,
        perturb_with=lambda trainable: sharpness_ascent(trainable, rho, adaptive=True),
        label_smoothing=smoothing,
        **options,
    )
    outcome.notes.append(f"ft-sam: adaptive SAM, rho {rho:g}, label smoothing {smoothing:g}")
    return outcome


FT_SAM = register(
    Defense(
        name="ft-sam",
        summary="fine-tuning with adaptive sharpness-aware minimisation (two passes per step)",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_ft_sam,
        params_type=FtSamParams,
    )
)
