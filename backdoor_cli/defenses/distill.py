"""FST with distillation of the input model's clean-data outputs (`fst-kd`): bdclean's own variant.

Measured on strong CIFAR-10 ResNets (docs/purification.md), the paper's FST loses much of the
model: its re-initialised head must be learnt again from a few hundred clean images, and the body
overfits them. Here every tuning batch adds `w * T^2 * KL(teacher || student)` at temperature T,
with the frozen input model as the teacher on the same clean (augmented) images (Hinton et al.,
2015). The head is still re-initialised, pushed away from the original (alpha * <W, W_orig>) and
held to its norm, so the features must still shift; the distillation asks only that the *clean*
predictions stay those of the input model. Triggered images are never seen, so nothing of the
trigger is used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.output_kind import LOGITS, LossAdapter
from .base import Defense, DefenseOutcome, MethodParams, register
from .fst import FstParams, run_fst


@dataclass(frozen=True)
class KdParams(MethodParams):
    """ft-kd's own: the distillation term (its weight measured: docs/purification.md)."""

    distill: float = 1.0  # weight of the distillation term
    distill_temperature: float = 2.0  # softmax temperature of the distillation


@dataclass(frozen=True)
class FstKdParams(KdParams, FstParams):
    """fst-kd's own: FST's alpha, then the distillation's (fields: alpha, distill, distill_temperature)."""


def distillation_term(
    teacher: torch.nn.Module,
    weight: float,
    temperature: float,
    adapter: LossAdapter = LOGITS,
    rows: Callable[[int], torch.Tensor] | None = None,
):
    """batch_penalty(inputs, scores) = weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Softmax is shift-invariant, so log-probabilities serve as logits; probabilities are taken to
    their log first. `adapter` says what the model returns and what `scores` tuning hands over.
    `rows(n)` (a 0/1 weight for each of the batch's n rows) limits the term to those rows, still divided by n: the
    unlearning distils only the images it did not stamp, since the input's outputs on a stamped image are the
    backdoor's."""
    teacher_kind = adapter.kind  # the teacher's forward returns the model's own output
    student_kind = "probs" if adapter.kind == "probs" and adapter.source == "log-of-output" else "logits"

    def term(inputs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(as_logits(teacher(inputs), teacher_kind) / temperature, dim=1)
        student = F.log_softmax(as_logits(scores, student_kind) / temperature, dim=1)
        if rows is None:
            return weight * temperature**2 * F.kl_div(student, target, log_target=True, reduction="batchmean")
        n = scores.shape[0]
        per_row = F.kl_div(student, target, log_target=True, reduction="none").sum(1)
        return weight * temperature**2 * (per_row * rows(n)).sum() / n

    return term


def as_logits(output: torch.Tensor, kind: str) -> torch.Tensor:
    output = output.float()
    if kind == "probs":
        return output.clamp_min(torch.finfo(torch.float32).tiny).log()
    return output  # logits, or log-probabilities (logits up to a per-row shift)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The input model as it is now, in eval mode (its BatchNorm statistics fixed), with no grads."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run_fst_kd(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """FST with the distillation term; `options` as for run_fst (callbacks, loss_adapter)."""
    term = distillation_term(
        frozen_copy(model), params.own.distill, params.own.distill_temperature, options.get("loss_adapter", LOGITS)
    )
    return run_fst(model, head_name, clean, mean, std, params, device, flip, batch_penalty=term, **options)


FST_KD = register(
    Defense(
        name="fst-kd",
        summary="FST plus distillation of the input model's clean-data outputs (bdclean's variant, lower accuracy cost)",
        reinit_head=True,
        trains="all",
        uses_alpha=True,
        run=run_fst_kd,
        params_type=FstKdParams,
    )
)


def run_ft_kd(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """Fine-tuning of all layers with the same distillation term (no head re-initialisation, no penalty)."""
    from .finetune import FT, run_tuning

    term = distillation_term(
        frozen_copy(model), params.own.distill, params.own.distill_temperature, options.get("loss_adapter", LOGITS)
    )
    return run_tuning(FT, model, head_name, clean, mean, std, params, device, flip, batch_penalty=term, **options)


FT_KD = register(
    Defense(
        name="ft-kd",
        summary="fine-tuning plus distillation of the input model's clean-data outputs (bdclean's variant)",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_ft_kd,
        params_type=KdParams,
    )
)
