"""CLP: channel Lipschitz bounds, the outlier rule, pruning, and the CLI method."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.defenses.clp import channel_bounds, conv_bn_pairs, lipschitz_bounds, prune
from backdoor_cli.errors import ConfigError
from backdoor_cli.models import build_model
from helpers import train_toy_model


class ConvBN(nn.Module):
    def __init__(self, channels=16):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.weight[5] *= 10  # one channel with a ten times larger kernel: the outlier

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bound_is_the_spectral_norm_times_the_batchnorm_scale():
    model = ConvBN()
    with torch.no_grad():
        model.bn.weight.fill_(2.0)
        model.bn.running_var.fill_(3.0)
    (bound,) = channel_bounds(model, [("conv", "bn")])
    w = model.conv.weight[0].detach().reshape(3, 9)
    expected = torch.linalg.matrix_norm(w, ord=2) * 2.0 / (3.0 + model.bn.eps) ** 0.5
    assert bound.uclc[0] == pytest.approx(float(expected), rel=1e-5)
    assert bound.uclc[5] == pytest.approx(10 * float(expected), rel=1e-5)


def test_only_the_outlier_channel_is_pruned_and_it_outputs_zero():
    model = ConvBN()
    bounds = lipschitz_bounds(model, torch.randn(2, 3, 8, 8))
    assert [(b.conv, b.bn) for b in bounds] == [("conv", "bn")]
    assert prune(model, bounds, u=3.0) == 1
    assert model.bn.weight[5] == 0 and model.bn.bias[5] == 0 and bool((model.bn.weight[:5] != 0).all())
    model.eval()
    out = model.bn(model.conv(torch.randn(4, 3, 8, 8)))
    assert torch.all(out[:, 5] == 0)
    assert prune(ConvBN(), lipschitz_bounds(ConvBN(), torch.randn(2, 3, 8, 8)), u=10.0) == 0


def test_pairs_follow_execution_on_a_cifar_resnet():
    model = build_model("resnet20", 10, 3)
    pairs = conv_bn_pairs(model, torch.randn(2, 3, 32, 32))
    assert len(pairs) == 19 and pairs[0] == ("conv1", "bn1")  # stem + 9 blocks x 2


def test_a_model_without_conv_batchnorm_pairs_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ConfigError, match="no"):
        lipschitz_bounds(model, torch.randn(2, 3, 2, 2))


def test_cli_clp_prunes_without_training(tmp_path):
    toy = train_toy_model(tmp_path, epochs=1)
    result = CliRunner().invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--out",
            str(tmp_path / "clp"),
            "--method",
            "clp",
            "--clp-u",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"]["name"] == "clp" and report["history"] == []
    assert report["method"]["notes"][0].startswith("clp: pruned ") and "at u = 1" in report["method"]["notes"][0]
    bad = CliRunner().invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--out",
            str(tmp_path / "x"),
            "--method",
            "clp",
            "--clp-u",
            "-1",
            "--quiet",
        ],
    )
    assert bad.exit_code == 2 and "--clp-u" in bad.output
