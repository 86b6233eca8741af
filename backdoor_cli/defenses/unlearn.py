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
from ..models.output_kind import LOGITS, LossAdapter
from ..scanning.guided import window_side
from .base import Defense, DefenseOutcome, MethodParams, register
from .finetune import run_tuning
from .window_search import DEFAULT_STEP, WindowSearch, search_share, window_searches


@dataclass(frozen=True)
class UnlearnParams(MethodParams):
    unlearn_fraction: float = 0.2  # share of each tuning batch stamped with a reconstructed trigger
    # pixel step of the pattern searched in each reconstruction's densest window during the run (window_search.py);
    # 0: stamp the reconstructions only
    window_step: float = DEFAULT_STEP


def trigger_stamp(
    triggers: Sequence,
    fraction: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    searches: Sequence[WindowSearch] = (),
    model: torch.nn.Module | None = None,
    adapter: LossAdapter = LOGITS,
):
    """stamp(inputs, generator): a random `fraction` of a normalised NCHW batch gets one of `triggers`
    (scan.ClassTrigger: mask (H, W), pattern (H, W, C) in [0, 1]) or of the window `searches`, each stamped image
    one drawn at random. The draws come from the tuning generator, so a run is reproducible from its seed.
    Before each stamp every search takes its step toward its target on `model` (window_search.py)."""
    if not triggers:
        raise ConfigError("unlearning needs at least one reconstructed trigger")
    if searches and model is None:
        raise ConfigError("a window search needs the model it searches on")
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
        which = torch.randint(len(masks) + len(searches), (n,), generator=generator, device=inputs.device)
        out = inputs
        for i, (mask, pattern) in enumerate(zip(masks, patterns)):
            pick = (chosen & (which == i))[:, None, None, None]
            out = torch.where(pick, inputs * (1 - mask) + mask * pattern, out)
        for j, search in enumerate(searches):
            search.advance(model, inputs[: search_share(n, fraction)], adapter)
            pick = (chosen & (which == len(masks) + j))[:, None, None, None]
            out = torch.where(pick, search.stamp(inputs), out)
        return out

    return stamp


def run_unlearn(
    model, head_name, clean, mean, std, params, device, flip=True, triggers=None, windows=(), **options
) -> DefenseOutcome:
    """Fine-tune all layers with `triggers` stamped on params.unlearn_fraction of each batch (labels kept); the
    local ones among them (`windows`: the scan's locality test decides) also get their window searched."""
    if not triggers:
        raise ConfigError("--method unlearn needs a reconstructed trigger, and none was passed")
    own = params.own
    searches = window_searches(windows, mean, std, device, own.window_step) if own.window_step > 0 else []
    stamp = trigger_stamp(
        triggers,
        own.unlearn_fraction,
        mean,
        std,
        device,
        searches=searches,
        model=model,
        adapter=options.get("loss_adapter", LOGITS),
    )
    outcome = run_tuning(UNLEARN, model, head_name, clean, mean, std, params, device, flip, stamp=stamp, **options)
    outcome.notes.append(
        f"unlearnt the reconstructed trigger of class {', '.join(str(t.target) for t in triggers)} on "
        f"{own.unlearn_fraction:.0%} of each batch, labels kept{window_words(searches, triggers, own.window_step)}"
    )
    return outcome


def window_words(searches: Sequence[WindowSearch], triggers: Sequence, step: float) -> str:
    """What the note says of the window search (or why there was none)."""
    if step <= 0:
        return ""
    if not searches:
        return "; no window was searched (no reconstruction is local: see the scan's locality test)"
    side = window_side(*triggers[0].mask.shape)
    classes = ", ".join(str(s.target) for s in searches)
    return (
        f"; the stamps drew evenly between the reconstructions and the densest {side}x{side} window of class "
        f"{classes}, opaque, with a pattern moved toward the class before every batch (step {step:g})"
    )


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
