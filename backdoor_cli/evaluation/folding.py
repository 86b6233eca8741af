"""BatchNorm folded into the convolution before it, for evaluation only.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be merged into
that convolution's weights and bias: the same function with one memory pass fewer per layer. On the
project's 2-core CPU this made fp32 evaluation of a conv-BN-ReLU network about 1.3x faster
(docs/performance.md). The folded model computes the same real-valued function; its fp32 results
differ from the unfolded forward only by rounding, about 1e-7 of the logits, the size of the
difference between the channels_last and contiguous memory formats, never a bf16-sized change.

The fold is made on a copy traced with torch.fx; the model itself is never changed. A model fx cannot
trace (data-dependent control flow, some hub models) is evaluated as it is, and the reason is kept.
`BDCLEAN_FOLD_BN=0` turns the fold off for a run (to compare, or to rule it out).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.fx  # already loaded by `import torch`: no start-up cost
from torch.nn.utils.fusion import fuse_conv_bn_weights

FOLD_ENV = "BDCLEAN_FOLD_BN"


@dataclass(frozen=True)
class FoldedModel:
    """The model evaluation runs, and how many BatchNorm layers were folded into it (0: the input itself)."""

    model: torch.nn.Module
    folded: int
    reason: str


def fold_enabled() -> bool:
    return os.environ.get(FOLD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def fold_batchnorm(model: torch.nn.Module) -> FoldedModel:
    """An eval-mode copy of `model` with every Conv2d -> BatchNorm2d pair merged, where the convolution's
    output feeds only the BatchNorm and the BatchNorm keeps running statistics. Without such a pair, or
    when the model cannot be traced, the model itself is returned with the reason."""
    if not fold_enabled():
        return FoldedModel(model, 0, f"not folded ({FOLD_ENV}=0)")
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return FoldedModel(model, 0, "no BatchNorm2d to fold")
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        # a hook (e.g. the loss reading a softmax's input) must see the modules the model calls; a
        # traced copy may inline a custom module and never call it
        return FoldedModel(model, 0, "not folded (forward hooks are attached)")
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported ops: evaluate the model as it is
        return FoldedModel(model, 0, f"not folded (fx cannot trace it: {type(exc).__name__})")
    # The traced module shares the model's leaf modules; each fused convolution is a new module set on
    # the traced copy's own parents, so the model's modules and parameters are never changed.
    modules = dict(traced.named_modules())
    folded = 0
    for node in list(traced.graph.nodes):
        if not _is_module(node, modules, torch.nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not _is_module(source, modules, torch.nn.Conv2d) or len(source.users) != 1:
            continue
        conv, bn = modules[source.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None or conv.padding_mode != "zeros":
            continue
        fused = _fused_conv(conv, bn)
        _replace(traced, source.target, fused)
        modules[source.target] = fused
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return FoldedModel(model, 0, "no convolution -> BatchNorm pair to fold")
    traced.graph.lint()
    traced.recompile()
    traced.train(model.training)  # the traced copy's own containers follow the model's mode
    return FoldedModel(traced, folded, f"{folded} BatchNorm layer(s) folded into their convolutions")


@torch.no_grad()
def _fused_conv(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """A new convolution computing conv then bn (eval mode); its weights keep the conv's memory format."""
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    return fused


def _is_module(node, modules: dict, kind: type) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), kind)


def _replace(root: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
