"""A model's early layers: the first share of its weight layers in forward order.

The default's unlearning holds them at the input's weights (defenses/unlearn.py): on the defender's own fresh
images, tuning the whole network cost a strong ResNet-32 3-4 points, and holding its first two stages cost less
and removed as much (docs/purification.md, thirteenth session). A weight layer is a leaf module with a weight of two
or more dimensions (convolutions, linear layers, embeddings); the leaf modules called before the first weight
layer left to train are held with them, so the BatchNorm layers among them keep the input's statistics too.

At least `MIN_TRAINED` weight layers before the head always train: in a shallow network every layer carries the
trigger's feature, and holding two thirds of a five-convolution CNN left 23% of its backdoor (tests/test_unlearn.py's
planted toy) where tuning it whole removes it. Six keeps a ResNet-20's two held stages (13 of its 19 convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .head import modules_in_forward_order

MIN_TRAINED = 6


@dataclass(frozen=True)
class EarlyLayers:
    """Leaf modules to hold, and how many of the model's weight layers they are."""

    names: list[str]  # leaf modules with parameters or buffers, in forward order
    held: int  # weight layers among them
    total: int  # weight layers of the model, the head included
    share: float  # the share asked for

    def describe(self) -> str:
        if not self.names:
            if self.share <= 0:
                return "every layer trained"
            return f"every layer trained (the model has {self.total} weight layers: too few to hold any)"
        return (
            f"the first {self.held} of {self.total} weight layers in forward order held at the input's weights, "
            f"BatchNorm statistics included ({self.names[0]} to {self.names[-1]})"
        )


def is_weight_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2


def early_layers(
    model: nn.Module, input_shape: tuple[int, int, int], share: float, head: str, keep: int = MIN_TRAINED
) -> EarlyLayers:
    """The leaf modules called before the first weight layer past round(share x weight layers), in forward order
    on a zero batch of `input_shape` (C, H, W); definition order where that pass fails. The head is never held,
    and at least `keep` weight layers before it train."""
    leaves = {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    order = list(dict.fromkeys(modules_in_forward_order(model, input_shape))) or list(leaves)
    weights = [n for n in order if is_weight_layer(leaves[n]) and n != head]
    count = max(0, min(round(len(weights) * share), len(weights) - max(keep, 1)))
    total = len(weights) + (head in leaves)
    if count == 0:
        return EarlyLayers([], 0, total, share)
    # everything called before the first weight layer left to train is held with the early weight layers
    cut = order.index(weights[count])
    names = [
        n
        for n in order[:cut]
        if n != head and (any(True for _ in leaves[n].parameters()) or any(True for _ in leaves[n].buffers()))
    ]
    return EarlyLayers(names, count, total, share)


def layers_held_at(model: nn.Module, image_shape: tuple[int, int, int], head: str, share: float) -> int:
    """How many weight layers `early_layers` holds at `share` for images of `image_shape` (H, W, C), the head `head`
    excluded (usecases/default_unlearning.py: a rerun after a dormant output must hold fewer)."""
    height, width, channels = image_shape
    return early_layers(model, (channels, height, width), share, head).held
