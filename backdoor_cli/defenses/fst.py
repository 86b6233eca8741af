"""Feature Shift Tuning (Min et al., "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023).

At low poisoning rates, fine-tuning barely moves the feature extractor: clean and backdoor
features stay entangled and the backdoor survives. FST re-initialises the head and, while tuning
all layers on clean data, penalises the head's alignment with the original head,
`alpha * <W, W_orig>`, so the features must shift away from the ones the original head (and the
backdoor) relied on. To stop the penalty from being satisfied trivially by shrinking W, W is
rescaled after every optimiser step to the original head's Frobenius norm C.

Only FST applies the penalty and the norm constraint. (The reference implementation rescales the
head in every tuning mode; we keep the baselines plain so each one is exactly what its name says.)
The bias is neither penalised nor rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, DefenseOutcome, MethodParams, get_head, register
from .finetune import run_tuning


@dataclass(frozen=True)
class FstParams(MethodParams):
    alpha: float = 0.2  # weight of the <W, W_orig> penalty (purify: the paper's value for the dataset)


def feature_shift_penalty(weight: torch.Tensor, original: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * <W, W_orig> (Frobenius inner product)."""
    return alpha * torch.sum(weight * original)


@torch.no_grad()
def project_to_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    """W <- W * C / ||W||_F, in place."""
    weight.mul_(norm / weight.norm())


def run_fst(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """`options`: run_tuning's callbacks and loss_adapter, passed through."""
    head = get_head(model, head_name)
    original = head.weight.detach().clone()
    target_norm = original.norm()
    outcome = run_tuning(
        FST,
        model,
        head_name,
        clean,
        mean,
        std,
        params,
        device,
        flip,
        penalty=lambda: feature_shift_penalty(head.weight, original, params.own.alpha),
        after_step=lambda: project_to_norm(head.weight, target_norm),
        **options,
    )
    outcome.head_norm = float(target_norm)
    return outcome


FST = register(
    Defense(
        name="fst",
        summary="feature shift tuning: re-initialised head pushed away from the original, norm held fixed",
        reinit_head=True,
        trains="all",
        uses_alpha=True,
        run=run_fst,
        params_type=FstParams,
    )
)
