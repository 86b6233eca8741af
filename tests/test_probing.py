"""models.probing: one forward pass in eval mode that leaves no trace on the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoor_cli.models.probing import probe_forward


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_modes_are_restored_and_hooks_removed_also_when_the_model_raises():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    model.train()
    model[1].eval()  # a frozen part must stay frozen, the rest training
    seen = []
    out = probe_forward(model, torch.zeros(2, 3, 4, 4), [(model[0], lambda m, i, o: seen.append(m.training))])
    assert seen == [False] and out.shape == (2, 2, 4, 4) and not out.requires_grad
    assert model.training and model[0].training and not model[1].training
    assert not model[0]._forward_hooks
    broken = nn.Sequential(nn.Identity(), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        probe_forward(broken, torch.zeros(1), [(broken[0], lambda m, i, o: None)])
    assert broken.training and not broken[0]._forward_hooks
