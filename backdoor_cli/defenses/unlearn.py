"""Unlearning a reconstructed trigger (`unlearn`): bdclean's trigger-free default.

A trigger inversion (scanning/inversion.py) reconstructs, for the suspect class, a mask and pattern that send clean
images there. Tuning all layers on the clean images with that reconstruction stamped on a share of
each batch, the labels kept true, teaches the model that the stamp means nothing: the shortcut into
the target class is unlearnt while the clean images keep the rest of the model (Wang et al., "Neural
Cleanse", S&P 2019, section 6; BTI-DBF(U), ICLR 2024, unlearns generated poisons the same way). The
head is kept and no term pulls toward the input model's outputs: distilling the input's outputs on
stamped images would teach the backdoor back (measured, issue 21).

The stamp is applied after augmentation, in the normalised space: ((1-m)x + m p - mean) / std equals
(1-m) x_n + m (p - mean) / std, so no un-normalising is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Defense, DefenseOutcome, MethodParams, register
from .finetune import run_tuning


@dataclass(frozen=True)
class UnlearnParams(MethodParams):
    unlearn_fraction: float = 0.2  # share of each tuning batch stamped with a reconstructed trigger


def trigger_stamp(triggers: Sequence, fraction: float, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
    """stamp(inputs, generator): a random `fraction` of a normalised NCHW batch gets one of `triggers`
    (scan.ClassTrigger: mask (H, W), pattern (H, W, C) in [0, 1]), each stamped image a trigger drawn at
    random. The draws come from the tuning generator, so a run is reproducible from its seed."""
    if not triggers:
        raise ConfigError("unlearning needs at least one reconstructed trigger")
    masks = [t.mask.to(device=device, dtype=torch.float32)[None, None] for t in triggers]
    patterns = [
        (
            (t.pattern.to(device=device, dtype=torch.float32).permute(2, 0, 1)[None] - mean.view(1, -1, 1, 1))
            / std.view(1, -1, 1, 1)
        )
        for t in triggers
    ]

    def stamp(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = inputs.shape[0]
        chosen = torch.rand(n, generator=generator, device=inputs.device) < fraction
        which = torch.randint(len(masks), (n,), generator=generator, device=inputs.device)
        out = inputs
        for i, (mask, pattern) in enumerate(zip(masks, patterns)):
            pick = (chosen & (which == i))[:, None, None, None]
            out = torch.where(pick, inputs * (1 - mask) + mask * pattern, out)
        return out

    return stamp


def run_unlearn(
    model, head_name, clean, mean, std, params, device, flip=True, triggers=None, **options
) -> DefenseOutcome:
    """Fine-tune all layers with `triggers` stamped on params.unlearn_fraction of each batch (labels kept)."""
    if not triggers:
        raise ConfigError("--method unlearn needs a reconstructed trigger, and none was passed")
    stamp = trigger_stamp(triggers, params.own.unlearn_fraction, mean, std, device)
    outcome = run_tuning(UNLEARN, model, head_name, clean, mean, std, params, device, flip, stamp=stamp, **options)
    classes = ", ".join(str(t.target) for t in triggers)
    outcome.notes.append(
        f"unlearnt the reconstructed trigger of class {classes} on {params.own.unlearn_fraction:.0%} "
        "of each batch, labels kept"
    )
    return outcome


UNLEARN = register(
    Defense(
        name="unlearn",
        summary="scan for a trigger, then fine-tune with the reconstructed trigger stamped on clean images, labels kept",
        reinit_head=False,
        trains="all",
        uses_alpha=False,
        run=run_unlearn,
        params_type=UnlearnParams,
        needs_triggers=True,
    )
)
