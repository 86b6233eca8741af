"""The built-in CIFAR ResNets (resnet20/32/44/56, option-A shortcuts): key-compatible with the
published akamaster checkpoints in ../shared, detected without --arch, and equal to the
bring-your-own example file on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.models import build_model, guess_architecture, load_strict

REPO = Path(__file__).resolve().parents[1]
IMAGENET_NORM = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


@pytest.mark.parametrize(
    "arch, blocks, params",
    [("resnet20", 3, 269_722), ("resnet32", 5, 464_154), ("resnet44", 7, 658_586), ("resnet56", 9, 853_018)],
)
def test_depths_and_parameter_counts(arch, blocks, params):
    model = build_model(arch, 10)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
    assert sum(p.numel() for p in model.parameters()) == params  # He et al. 2016, table 6: 0.27M ... 0.85M


def test_builtin_resnet20_equals_the_example_file():
    torch.manual_seed(0)
    example = build_model(f"{REPO / 'examples' / 'models' / 'resnet20.py'}:resnet20", 10)
    builtin = build_model("resnet20", 10)
    load_strict(builtin, example.state_dict())
    x = torch.randn(4, 3, 32, 32)
    example.eval(), builtin.eval()
    with torch.no_grad():
        assert torch.equal(example(x), builtin(x))


@pytest.mark.parametrize("name, arch", [("resnet20-12fca82f.th", "resnet20"), ("resnet56-4bfd9763.th", "resnet56")])
def test_shared_checkpoints_are_detected_and_evaluate_without_arch(shared_dir, name, arch):
    path = shared_dir / "checkpoints" / name
    assert guess_architecture(read_checkpoint(path).state_dict).arch == arch
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(path),
            "--data",
            str(shared_dir / "cifar10"),
            *IMAGENET_NORM,
            "--eval-limit",
            "500",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["arch"] == arch and report["checkpoint"]["resolved_from"]["arch"] == "weights"
    assert report["metrics"]["clean_acc"]["value"] > 0.88  # published: 91.73% / 93.39% on all 10,000
