"""Channel Lipschitzness-based pruning (`clp`; Zheng et al., "Data-Free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022): no training, no data, no trigger.

A backdoor makes a few channels react strongly to a small input pattern, and such a channel has a
large Lipschitz constant. For every convolution followed directly by a BatchNorm, the upper bound of
channel k's Lipschitz constant (UCLC) is the spectral norm of its kernel, reshaped to
(in_channels, kh·kw), times |γ_k| / sqrt(var_k + eps). Within each layer, a channel whose UCLC is
more than u standard deviations above the layer's mean is pruned: its BatchNorm scale and shift are
set to 0, so it outputs 0 whatever the input. The paper's u is 3.

The conv -> BatchNorm pairs are found by one probe forward in execution order (the BatchNorm must
consume the convolution's output tensor), so any architecture with that pattern works; models
without it are refused with a clear error rather than left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.datasets import normalize
from ..errors import ConfigError
from ..models.probing import probe_forward
from .base import Defense, DefenseOutcome, MethodParams, register

PAPER_U = 3.0


@dataclass(frozen=True)
class ClpParams(MethodParams):
    clp_u: float | None = None  # prune channels more than u std above their layer's mean bound (None: PAPER_U)

    DEFAULTS: ClassVar[dict[str, object]] = {"clp_u": PAPER_U}


@dataclass
class ChannelBound:
    """One conv -> BatchNorm pair and the UCLC of each of its channels."""

    conv: str
    bn: str
    uclc: torch.Tensor  # (out_channels,)

    def over(self, u: float) -> torch.Tensor:
        """Channels more than u standard deviations above the layer's mean UCLC."""
        if self.uclc.numel() < 2:
            return torch.zeros_like(self.uclc, dtype=torch.bool)
        return self.uclc > self.uclc.mean() + u * self.uclc.std()


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for each BatchNorm2d whose input is exactly a Conv2d's output."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []

    def on_conv(module, _inputs, output):
        outputs[id(output)] = names[module]

    def on_bn(module, inputs, _output):
        conv = outputs.get(id(inputs[0]))
        if conv is not None and module.num_features == model.get_submodule(conv).out_channels:
            pairs.append((conv, names[module]))

    hooks = [(m, on_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [(m, on_bn) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    probe_forward(model, example, hooks)
    return pairs


@torch.no_grad()
def channel_bounds(model: nn.Module, pairs: list[tuple[str, str]]) -> list[ChannelBound]:
    bounds = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight = conv.weight.detach().float()
        per_channel = torch.linalg.matrix_norm(weight.flatten(2), ord=2)  # (out, in, kh*kw) -> spectral norm per out
        scale = bn.weight.detach().float().abs() if bn.weight is not None else torch.ones_like(per_channel)
        std = (bn.running_var.detach().float() + bn.eps).sqrt() if bn.running_var is not None else 1.0
        bounds.append(ChannelBound(conv_name, bn_name, (per_channel * scale / std).cpu()))
    return bounds


@torch.no_grad()
def prune(model: nn.Module, bounds: list[ChannelBound], u: float) -> int:
    """Zero the BatchNorm scale and shift of every channel over the threshold; returns how many."""
    total = 0
    for bound in bounds:
        mask = bound.over(u)
        if mask.any():
            bn = model.get_submodule(bound.bn)
            index = mask.nonzero().flatten().to(bn.weight.device)
            bn.weight.index_fill_(0, index, 0.0)
            if bn.bias is not None:
                bn.bias.index_fill_(0, index, 0.0)
            total += int(mask.sum())
    return total


def lipschitz_bounds(model: nn.Module, example: torch.Tensor) -> list[ChannelBound]:
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        raise ConfigError(
            "clp prunes channels of convolutions followed by BatchNorm, and this model has none",
            hint="choose a tuning method (e.g. --method fst) for this architecture",
        )
    return channel_bounds(model, pairs)


def run_clp(model, head_name, clean, mean, std, params, device, flip=True, **options) -> DefenseOutcome:
    """Prune at u (params.clp_u, the paper's 3 by default). `clean` is used only for the probe batch
    that finds the conv -> BatchNorm pairs (its values do not matter)."""
    u = params.value("clp_u")
    example = normalize(clean.x[:2].to(device), mean, std)
    bounds = lipschitz_bounds(model, example)
    pruned = prune(model, bounds, u)
    channels = sum(b.uclc.numel() for b in bounds)
    return DefenseOutcome(
        history=[],
        notes=[f"clp: pruned {pruned} of {channels} channels in {len(bounds)} conv/BatchNorm layers at u = {u:g}"],
    )


CLP = register(
    Defense(
        name="clp",
        summary="channel Lipschitzness pruning: zero the channels whose Lipschitz bound is an outlier (no training)",
        reinit_head=False,
        trains="none",
        uses_alpha=False,
        run=run_clp,
        params_type=ClpParams,
    )
)
