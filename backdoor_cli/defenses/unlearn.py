"""Unlearning a reconstructed trigger (`unlearn`): bdclean's trigger-free default.

A trigger inversion (scanning/inversion.py) reconstructs, for the suspect class, a mask and pattern that send clean
images there. Tuning the model on the clean images with that reconstruction stamped on a share of
each batch, the labels kept true, teaches the model that the stamp means nothing: the shortcut into
the target class is unlearnt while the clean images keep the rest of the model (Wang et al., "Neural
Cleanse", S&P 2019, section 6; BTI-DBF(U), ICLR 2024, unlearns generated poisons the same way). The
head is kept and no term pulls toward the input model's outputs: distilling the input's outputs on
stamped images would teach the backdoor back (measured, issue 21).

When every reconstruction is local (a patch), the early layers stay at the input's weights (`frozen_depth`,
models/depth.py: the first two thirds of the weight layers in forward order, BatchNorm statistics included). On
the defender's own fresh images, tuning every layer cost a strong ResNet-32 3.85 points; holding its first two
stages cost 2.35 and left less of the backdoor (docs/purification.md, thirteenth session). The reading: a few
hundred images have little to teach the early, generic features but forgetting, and a patch's shortcut can be
unlearnt in the layers after them. A spread-out trigger (blend, warp, signal) changes every pixel a little, which
the early layers see: with them held a WaNet subject kept twice the backdoor, so a spread-out reconstruction is
unlearnt with every layer. A network too shallow to keep six weight layers training behind the held ones is tuned
whole. Held layers can keep a backdoor dormant (a VGG-16-BN's came back after retuning): the outcome names them
(`DefenseOutcome.held`), and purify checks such an output with the scan's reconstruction (verdicts/dormancy.py).

The stamp is applied after augmentation, in the normalised space: ((1-m)x + m p - mean) / std equals
(1-m) x_n + m (p - mean) / std, so no un-normalising is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.depth import early_layers
from ..models.output_kind import LOGITS, LossAdapter
from ..scanning.guided import window_side
from .base import Defense, DefenseOutcome, MethodParams, register
from .distill import distillation_term, frozen_copy
from .finetune import run_tuning
from .window_search import DEFAULT_STEP, WindowSearch, search_share, window_searches

FROZEN_DEPTH = 2 / 3  # measured against 1/3 and 0 (every layer) on four cells: docs/purification.md


@dataclass(frozen=True)
class UnlearnParams(MethodParams):
    unlearn_fraction: float = 0.2  # share of each tuning batch stamped with a reconstructed trigger
    # pixel step of the pattern searched in each reconstruction's densest window during the run (window_search.py);
    # 0: stamp the reconstructions only
    window_step: float = DEFAULT_STEP
    # share of the weight layers, first in forward order, held at the input's weights (and statistics) when every
    # reconstruction is local; 0: tune every layer
    frozen_depth: float = FROZEN_DEPTH
    # weight of the input model's outputs distilled on the images of each batch that carry no stamp (T^2 KL at
    # distill_temperature, as fst-kd's); 0: none. The default's first run does not distil (it kept a VGG's backdoor
    # dormant); its reruns after a dormant output use RERUN_DISTILL (usecases/default_unlearning.py).
    distill: float = 0.0
    distill_temperature: float = 2.0


class TriggerStamp:
    """stamp(inputs, generator): a random `fraction` of a normalised NCHW batch gets one of the reconstructions or of
    the window searches (built by trigger_stamp). `unstamped(n)` says which of the last batch's n rows carry no stamp,
    from a buffer filled in place (a captured CUDA graph reads the current batch's rows)."""

    def __init__(self, masks, patterns, fraction, searches, model, adapter):
        self.masks, self.patterns, self.fraction = masks, patterns, fraction
        self.searches, self.model, self.adapter = searches, model, adapter
        self.clean_rows: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = inputs.shape[0]
        chosen = torch.rand(n, generator=generator, device=inputs.device) < self.fraction
        which = torch.randint(len(self.masks) + len(self.searches), (n,), generator=generator, device=inputs.device)
        out = inputs
        for i, (mask, pattern) in enumerate(zip(self.masks, self.patterns)):
            pick = (chosen & (which == i))[:, None, None, None]
            out = torch.where(pick, inputs * (1 - mask) + mask * pattern, out)
        for j, search in enumerate(self.searches):
            search.advance(self.model, inputs[: search_share(n, self.fraction)], self.adapter)
            pick = (chosen & (which == len(self.masks) + j))[:, None, None, None]
            out = torch.where(pick, search.stamp(inputs), out)
        if self.clean_rows is None or self.clean_rows.shape[0] < n:
            self.clean_rows = torch.zeros(n, device=inputs.device)
        self.clean_rows[:n].copy_(~chosen)
        return out

    def unstamped(self, n: int) -> torch.Tensor:
        """1.0 for each of the last batch's first n rows that carries no stamp, 0.0 for the others."""
        if self.clean_rows is None:
            raise RuntimeError("unstamped() asked before the first batch was stamped")
        return self.clean_rows[:n]


def trigger_stamp(
    triggers: Sequence,
    fraction: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    searches: Sequence[WindowSearch] = (),
    model: torch.nn.Module | None = None,
    adapter: LossAdapter = LOGITS,
) -> TriggerStamp:
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
    return TriggerStamp(masks, patterns, fraction, list(searches), model, adapter)


def run_unlearn(
    model, head_name, clean, mean, std, params, device, flip=True, triggers=None, windows=(), **options
) -> DefenseOutcome:
    """Fine-tune with `triggers` stamped on params.unlearn_fraction of each batch (labels kept); the local ones among
    them (`windows`: the scan's locality test decides) also get their window searched. The early layers
    (params.frozen_depth) are held when every trigger is local (holds_early_layers)."""
    if not triggers:
        raise ConfigError("--method unlearn needs a reconstructed trigger, and none was passed")
    own = params.own
    h, w, c = clean.image_shape
    hold = holds_early_layers(triggers, windows)
    early = early_layers(model, (c, h, w), own.frozen_depth if hold else 0.0, head_name)
    searches = window_searches(windows, mean, std, device, own.window_step) if own.window_step > 0 else []
    adapter = options.get("loss_adapter", LOGITS)
    stamp = trigger_stamp(
        triggers, own.unlearn_fraction, mean, std, device, searches=searches, model=model, adapter=adapter
    )
    modules = dict(model.named_modules())
    options["held"] = [modules[n] for n in early.names]
    if own.distill > 0:
        # The teacher is the model as the run starts (the input's weights); only unstamped rows are distilled.
        options["batch_penalty"] = distillation_term(
            frozen_copy(model), own.distill, own.distill_temperature, adapter, rows=stamp.unstamped
        )
    outcome = run_tuning(UNLEARN, model, head_name, clean, mean, std, params, device, flip, stamp=stamp, **options)
    outcome.notes.append(
        f"unlearnt the reconstructed trigger of class {', '.join(str(t.target) for t in triggers)} on "
        f"{own.unlearn_fraction:.0%} of each batch, labels kept{window_words(searches, triggers, own.window_step)}; "
        + (early.describe() if hold or own.frozen_depth <= 0 else SPREAD_OUT)
        + distill_words(own)
    )
    outcome.held = early if early.names else None
    return outcome


SPREAD_OUT = (
    "every layer trained: a reconstruction is spread out (a blend-, warp- or signal-like trigger, which changes "
    "every pixel a little and reaches the early layers)"
)


def distill_words(own: UnlearnParams) -> str:
    """What the note says of the distillation (nothing when there was none)."""
    if own.distill <= 0:
        return ""
    return (
        f"; the input model's outputs distilled on the unstamped images (weight {own.distill:g}, temperature "
        f"{own.distill_temperature:g}), so the layers trained keep what it says of clean images"
    )


def holds_early_layers(triggers: Sequence, windows: Sequence) -> bool:
    """Whether the early layers may be held: only when every reconstruction unlearnt is local (the scan's locality
    test put it in `windows`). Held for spread-out ones, a WaNet subject kept 33.9% of its backdoor where tuning every
    layer left 15.3%, and another's unlearning cost the held-out images enough to be undone (docs/purification.md)."""
    local = {t.target for t in windows}
    return bool(triggers) and all(t.target in local for t in triggers)


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
