"""Shared adversarial unlearning (`sau`; Wei et al., "Shared Adversarial Unlearning: Backdoor Mitigation
by Unlearning Shared Adversarial Examples", NeurIPS 2023), written from the paraphrase in the project's
research notes (purification-anchors.md §3.2), not from BackdoorBench's code.

A backdoor trigger is an adversarial perturbation the backdoored model shares with every model that
still carries it. SAU looks, on each clean batch, for small perturbations that fool the model being
purified (θ) and the frozen input model (θ_ref) *in the same way*, and unlearns them.

Per batch:

1. Shared adversarial examples, by PGD in the L∞ ball of radius ε (pixel units, [0, 1] images):
   δ starts at +ε everywhere; each of `steps` steps takes δ ← clip_ε(δ − ε · sign ∇_δ J) with the
   perturbed image clipped to [0, 1], where

       J = β₁ · L_adv + β₂ · L_share,   β₁ = 0.01, β₂ = 1,
       L_adv   = −Σ_{m ∈ {θ, θ_ref}} mean_{i: m(x_i+δ_i) = y_i} CE(m(x_i + δ_i), y_i)
       L_share = mean_{i not shared} JS(softmax θ(x_i+δ_i) ‖ softmax θ_ref(x_i+δ_i)),

   an image being *shared* when both models give it the same wrong label. Shared images have no
   gradient left (both terms mask them), and the attack stops once every image is shared. Both models
   are in eval mode during the attack, so it changes no BatchNorm statistics.
2. Unlearning: with ỹ the frozen model's label on x + δ and P the images it gets wrong ("potential
   poison"), the objective is

       λ₁ · CE(θ(x), y) + λ₂ · mean_i CE(θ(x_i + δ_i), y_i) + λ₃ · mean_{i ∈ P} −log(1 − p_θ(ỹ_i | x_i + δ_i))

   (the first term is the loop's tuning loss). The last term makes the purified model disagree with the
   backdoored model's adversarial prediction.

Settings (note §3.2 and §2.6): ε 0.2, 5 steps of size ε, β₁ 0.01, β₂ 1, λ = (1, 0, 1): BackdoorBench's
CIFAR-10 config. The paper's own numbering (λ1 = λ2 = λ4 = 1, λ3 = 0.01, per a quoted setup) names its
terms differently; which paper weight is which term here was not established, so the code's values
are used.

Departures from the reference:
- bdclean's SGD and schedule (--lr, --epochs) instead of Adam at 1e-4 for 100 epochs.
- The model tunes in train mode (the loop's default; the attack itself runs in eval mode). The
  perturbed batch's forward normalises by its own batch statistics but does not update the running
  ones (`statistics_kept`). The reference's default holds the whole model in eval mode; with SGD at
  lr 0.01 that diverged on a planted toy subject (logits grew without bound: nothing renormalises
  the activations while the unlearning term fights the clean loss). Letting the perturbed batches
  update the running statistics too collapsed a CIFAR-10 ResNet-20's accuracy to 25% while its
  training loss stayed low (docs/purification.md).
- Every step is eager on CUDA (the attack's early stop reads a flag back each step).

Cost per batch: up to `steps` forward+backward passes of both models on the batch, then one forward of
θ_ref and one forward+backward of θ on the perturbed batch besides the clean step: with 5 steps about
7-12 times a fine-tuning step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..evaluation.measure import eval_mode
from ..models.output_kind import LOGITS
from ..precision import autocast, default_precision
from .base import Defense, DefenseOutcome, MethodParams, register
from .distill import as_logits, frozen_copy
from .finetune import run_tuning

ADV_WEIGHT = 0.01  # β₁: weight of the attack's misclassification term (BackdoorBench's CIFAR-10 config)
SHARE_WEIGHT = 1.0  # β₂: weight of the attack's agreement term


@dataclass(frozen=True)
class SauParams(MethodParams):
    sau_eps: float | None = None  # L-inf radius of the shared adversarial examples, in [0, 1] pixel units (None: 0.2)
    sau_steps: int | None = None  # PGD steps per batch (None: 5)
    sau_lambda: tuple[float, ...] | None = (
        None  # weights of clean CE, adversarial CE, shared unlearning (None: 1, 0, 1)
    )

    # BackdoorBench's CIFAR-10 config: L-inf 0.2 in [0, 1] pixels, 5 PGD steps, weights 1, 0, 1
    DEFAULTS: ClassVar[dict[str, object]] = {
        "sau_eps": 0.2,
        "sau_steps": 5,
        "sau_lambda": (1.0, 0.0, 1.0),
        "label_smoothing": 0.0,
    }

    def validate(self) -> SauParams:
        super().validate()
        if self.sau_lambda is not None and len(self.sau_lambda) != 3:
            raise ConfigError(
                "--sau-lambda must be three weights in [0, 1e6] (clean CE, adversarial CE, shared "
                f"unlearning), got {self.sau_lambda}"
            )
        return self


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the rows in `mask` (0 when none); no host read."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen–Shannon divergence between softmax(a) and softmax(b) (natural log)."""
    log_p, log_q = F.log_softmax(logits_a, 1), F.log_softmax(logits_b, 1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return 0.5 * (kl_pm + kl_qm)


def log_one_minus_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(1 − softmax(logits)[label]) per row, stably: logsumexp over the other classes − logsumexp."""
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)


@contextlib.contextmanager
def statistics_kept(model: torch.nn.Module):
    """BatchNorm layers in train mode still normalise by the batch's statistics but leave their running
    statistics (and batch count) as they were: the perturbed batches must not become the statistics the
    purified model is evaluated with."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield model
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def shared_adversarial(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float,
    steps: int,
    kind: str = "logits",
    precision: str = "fp32",
) -> torch.Tensor:
    """Shared adversarial examples for normalised `inputs`, as normalised images (see the module docstring).

    δ is in pixel units: the perturbed image is clip(x + δ, 0, 1) in pixel space, i.e. each pixel moves
    by at most `eps` and stays a valid [0, 1] value. No parameter gradient is touched."""
    device = inputs.device
    low, high = (0 - mean) / std, (1 - mean) / std
    inputs = inputs.detach()
    delta = torch.full_like(inputs, eps)
    with eval_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            perturbed = torch.maximum(torch.minimum(inputs + delta / std, high), low)
            with autocast(device, precision):
                ours = as_logits(model(perturbed), kind)
                theirs = as_logits(reference(perturbed), kind)
            ours_label, theirs_label = ours.argmax(1), theirs.argmax(1)
            shared = (ours_label == theirs_label) & (ours_label != labels)
            if bool(shared.all()):
                break
            adv = -(
                masked_mean(F.cross_entropy(ours, labels, reduction="none"), ours_label == labels)
                + masked_mean(F.cross_entropy(theirs, labels, reduction="none"), theirs_label == labels)
            )
            share = masked_mean(js_divergence(ours, theirs), ~shared)
            (grad,) = torch.autograd.grad(ADV_WEIGHT * adv + SHARE_WEIGHT * share, delta)
            delta = (delta.detach() - eps * grad.sign()).clamp(-eps, eps)
    return torch.maximum(torch.minimum(inputs + delta.detach() / std, high), low)


def unlearning_objective(
    model,
    reference,
    mean,
    std,
    eps: float,
    steps: int,
    weights: tuple[float, ...],
    kind: str = "logits",
    precision: str = "fp32",
):
    """objective(loss, inputs, labels, scores) for tuning.tune: SAU's three weighted terms."""
    w_clean, w_adv, w_shared = weights

    def objective(loss, inputs, labels, _scores):
        perturbed = shared_adversarial(model, reference, inputs, labels, mean, std, eps, steps, kind, precision)
        with torch.no_grad(), autocast(inputs.device, precision):
            their_label = as_logits(reference(perturbed), kind).argmax(1)
        with statistics_kept(model), autocast(inputs.device, precision):
            ours = as_logits(model(perturbed), kind).float()
        term = w_clean * loss
        if w_adv:
            term = term + w_adv * F.cross_entropy(ours, labels)
        if w_shared:
            poison = their_label != labels
            term = term + w_shared * masked_mean(-log_one_minus_prob(ours, their_label), poison)
        return term

    return objective


def run_sau(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """`options`: run_tuning's callbacks, loss_adapter and precision, passed through."""
    eps = params.value("sau_eps")
    steps = params.value("sau_steps")
    weights = tuple(params.value("sau_lambda"))
    adapter = options.get("loss_adapter", LOGITS)
    precision = options.get("precision") or default_precision(device)
    reference = frozen_copy(model)
    objective = unlearning_objective(model, reference, mean, std, eps, steps, weights, adapter.kind, precision)
    outcome = run_tuning(
        SAU,
        model,
        head_name,
        clean,
        mean,
        std,
        params,
        device,
        flip,
        objective=objective,
        cuda_graphs=False,
        label_smoothing=params.value("label_smoothing"),
        **options,
    )
    outcome.notes.append(
        f"sau: PGD L-inf {eps:g} (pixel units), {steps} steps of {eps:g}, attack weights "
        f"{ADV_WEIGHT:g}/{SHARE_WEIGHT:g}; lambda clean {weights[0]:g}, adversarial {weights[1]:g}, "
        f"shared {weights[2]:g}; attack in eval mode, tuning in train mode"
    )
    return outcome


SAU = register(
    Defense(
        name="sau",
        summary="shared adversarial unlearning: unlearn perturbations that fool the model and the input model alike",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_sau,
        params_type=SauParams,
    )
)
